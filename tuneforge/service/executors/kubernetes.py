"""Jobs as Kubernetes objects through the official ``kubernetes`` client: one ``batch/v1`` Job per fine-tuning job.

The shape follows ``deploy/kubernetes/tuneforge-elastic.yaml``: the pods run the same ``tuneforge train`` command
as a local job, with the service's state directory (files, recipes, run directories) on a shared volume mounted
at the same path. An elastic job is an *Indexed* Job with one replica per pod, a lighthouse Deployment + Service
beside it; resizing patches ``parallelism`` and ``completions`` together (elastic Indexed Jobs, Kubernetes ≥ 1.31).

What is tested without a cluster: the rendered objects are the client's own models (validated when built and
round-tripped through its serializer), and :func:`job_status` — the state machine from a Job's status — on
Job objects in every state. Creating, watching and deleting objects on a live cluster is not tested here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from tuneforge.service.executors.base import Launch, Status

LIGHTHOUSE_PORT = 29510
LABEL = "tuneforge.dev/job"


def _name(job_id: str) -> str:
    return job_id.replace("_", "-").lower()[:52]  # DNS-1123, leaving room for pod suffixes


def render(
    launch: Launch,
    *,
    image: str,
    namespace: str,
    replicas: int,
    min_replicas: int = 1,
    state_claim: str = "tuneforge-state",
    state_path: str,
    resources: dict[str, str] | None = None,
) -> list[Any]:
    """The objects of one attempt: ``[Job]``, or ``[Deployment, Service, Job]`` for an elastic job."""
    name = _name(launch.job_id)
    labels = {"app.kubernetes.io/name": "tuneforge", LABEL: name}
    meta = k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels)
    volume = k8s.V1Volume(
        name="state", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=state_claim)
    )
    mount = k8s.V1VolumeMount(name="state", mount_path=state_path)
    env = [k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"), k8s.V1EnvVar(name="TUNEFORGE_JOB_ID", value=launch.job_id)]
    env += [k8s.V1EnvVar(name=k, value=v) for k, v in launch.env.items() if k != "TUNEFORGE_JOB_ID"]
    command = ["tuneforge", *launch.train_args()]
    objects: list[Any] = []
    if launch.replicas:
        lh_name = f"{name}-lh"
        lh_labels = {**labels, "app.kubernetes.io/component": "lighthouse"}
        objects.append(
            k8s.V1Deployment(
                api_version="apps/v1",
                kind="Deployment",
                metadata=k8s.V1ObjectMeta(name=lh_name, namespace=namespace, labels=lh_labels),
                spec=k8s.V1DeploymentSpec(
                    replicas=1,
                    selector=k8s.V1LabelSelector(match_labels=lh_labels),
                    strategy=k8s.V1DeploymentStrategy(type="Recreate"),
                    template=k8s.V1PodTemplateSpec(
                        metadata=k8s.V1ObjectMeta(labels=lh_labels),
                        spec=k8s.V1PodSpec(
                            containers=[
                                k8s.V1Container(
                                    name="lighthouse",
                                    image=image,
                                    command=[
                                        "tuneforge",
                                        "lighthouse",
                                        "--bind",
                                        f"0.0.0.0:{LIGHTHOUSE_PORT}",
                                        "--min-replicas",
                                        str(min_replicas),
                                    ],
                                    ports=[k8s.V1ContainerPort(container_port=LIGHTHOUSE_PORT, name="lighthouse")],
                                )
                            ]
                        ),
                    ),
                ),
            )
        )
        objects.append(
            k8s.V1Service(
                api_version="v1",
                kind="Service",
                metadata=k8s.V1ObjectMeta(name=lh_name, namespace=namespace, labels=lh_labels),
                spec=k8s.V1ServiceSpec(
                    selector=lh_labels, ports=[k8s.V1ServicePort(port=LIGHTHOUSE_PORT, target_port=LIGHTHOUSE_PORT)]
                ),
            )
        )
        # one replica per pod; the pods find each other through the lighthouse, each with its own run directory
        command = [
            "tuneforge",
            "train",
            str(launch.recipe),
            "--quiet",
            "--replicas",
            "1:1",
            "--set",
            f"resilience.lighthouse={lh_name}:{LIGHTHOUSE_PORT}",
            "--set",
            "resilience.node=trainer-$(NODE_INDEX)",
            "--set",
            "resilience.bind_host=$(POD_IP)",
            "--set",
            f"output.dir={launch.run_dir}/node-$(NODE_INDEX)",
        ]
        env += [
            k8s.V1EnvVar(
                name="POD_IP",
                value_from=k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(field_path="status.podIP")),
            ),
            k8s.V1EnvVar(
                name="NODE_INDEX",
                value_from=k8s.V1EnvVarSource(
                    field_ref=k8s.V1ObjectFieldSelector(
                        field_path="metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    )
                ),
            ),
        ]
    container = k8s.V1Container(
        name="trainer",
        image=image,
        command=command,
        env=env,
        volume_mounts=[mount],
        working_dir=str(launch.workdir),
        resources=k8s.V1ResourceRequirements(requests=resources, limits=resources) if resources else None,
    )
    objects.append(
        k8s.V1Job(
            api_version="batch/v1",
            kind="Job",
            metadata=meta,
            spec=k8s.V1JobSpec(
                completion_mode="Indexed" if launch.replicas else "NonIndexed",
                completions=replicas,
                parallelism=replicas,
                backoff_limit=3,
                template=k8s.V1PodTemplateSpec(
                    metadata=k8s.V1ObjectMeta(labels=labels),
                    spec=k8s.V1PodSpec(
                        containers=[container],
                        volumes=[volume],
                        restart_policy="OnFailure" if launch.replicas else "Never",
                        termination_grace_period_seconds=60,
                    ),
                ),
            ),
        )
    )
    return objects


def job_status(job: Any | None) -> Status:
    """A Job's state as the scheduler sees it: gone → lost; Complete → exited 0; Failed → exited 1; else running."""
    if job is None:
        return Status("lost")
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.status != "True":
            continue
        if condition.type in ("Complete", "SuccessCriteriaMet"):
            return Status("exited", 0)
        if condition.type in ("Failed", "FailureTarget"):
            return Status("exited", 1)
    return Status("running")


class KubernetesExecutor:
    """The :class:`~tuneforge.service.executors.Executor` seam over a cluster (in-cluster or kubeconfig)."""

    def __init__(
        self,
        python: str | None = None,
        *,
        image: str = "ghcr.io/your-org/tuneforge:latest",
        namespace: str = "default",
        state_claim: str = "tuneforge-state",
        state_path: str | None = None,
        api: Any | None = None,
    ) -> None:
        del python  # pods run the image's interpreter
        self.image, self.namespace, self.state_claim, self.state_path = image, namespace, state_claim, state_path
        self._api = api

    def api(self) -> Any:
        if self._api is None:
            from kubernetes import config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = k8s.ApiClient()
        return self._api

    def start(self, launch: Launch) -> dict[str, Any]:
        from tuneforge.paths import state_dir

        replicas = int(launch.replicas.split(":")[1]) if launch.replicas else 1
        objects = render(
            launch,
            image=self.image,
            namespace=self.namespace,
            replicas=replicas,
            min_replicas=int(launch.replicas.split(":")[0]) if launch.replicas else 1,
            state_claim=self.state_claim,
            state_path=self.state_path or str(state_dir()),
        )
        api = self.api()
        for obj in objects:
            if isinstance(obj, k8s.V1Deployment):
                k8s.AppsV1Api(api).create_namespaced_deployment(self.namespace, obj)
            elif isinstance(obj, k8s.V1Service):
                k8s.CoreV1Api(api).create_namespaced_service(self.namespace, obj)
            else:
                k8s.BatchV1Api(api).create_namespaced_job(self.namespace, obj)
        return {"executor": "kubernetes", "name": _name(launch.job_id), "namespace": self.namespace}

    def status(self, handle: dict[str, Any]) -> Status:
        from kubernetes.client.exceptions import ApiException

        try:
            job = k8s.BatchV1Api(self.api()).read_namespaced_job_status(handle["name"], handle["namespace"])
        except ApiException as e:
            if e.status == 404:
                return job_status(None)
            raise
        return job_status(job)

    def stop(self, handle: dict[str, Any], *, force: bool = False) -> None:
        body = k8s.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=0 if force else None)
        k8s.BatchV1Api(self.api()).delete_namespaced_job(handle["name"], handle["namespace"], body=body)

    def scale(self, handle: dict[str, Any], run_dir: Path, replicas: int) -> bool:
        patch = {"spec": {"parallelism": replicas, "completions": replicas}}
        k8s.BatchV1Api(self.api()).patch_namespaced_job(handle["name"], handle["namespace"], patch)
        return True

    def log_tail(self, handle: dict[str, Any], n_bytes: int = 8192) -> str:
        core = k8s.CoreV1Api(self.api())
        pods = core.list_namespaced_pod(handle["namespace"], label_selector=f"{LABEL}={handle['name']}").items
        if not pods:
            return ""
        return core.read_namespaced_pod_log(pods[0].metadata.name, handle["namespace"], limit_bytes=n_bytes)
