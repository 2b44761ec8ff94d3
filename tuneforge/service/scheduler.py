"""The scheduler: a thread in the server that moves jobs through their states; training happens elsewhere.

Each tick, in order:

1. **validate** ``validating_files`` jobs: every record of the training (and validation, mixture) files against
   the method's formats — the report of ``tuneforge data validate`` — then resolve ``auto`` hyperparameters and
   write the recipe. Bad data fails that job alone, naming file, line and field.
2. **stop** processes of jobs that were cancelled or paused (SIGTERM, SIGKILL after a grace period).
3. **follow** running jobs: new steps, checkpoints and replica events become events; a finished process
   becomes ``succeeded`` / ``failed``; a lost one (its runner died with it) is resumed from its last checkpoint.
4. **place** queued jobs by priority on the free slots. When a higher-priority job does not fit, running
   *elastic* jobs of lower priority are **shrunk** (through the elastic engine's scale API — they keep their
   global batch and lose no step) to make room, and **regrown** when slots free up and nothing waits.

All state is in the database and the run directories, so a restarted server picks up where the last one was:
queued jobs stay queued, running ones are re-attached through their executor handle.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.errors import TuneforgeError
from tuneforge.models import fine_tuned
from tuneforge.service import mapping
from tuneforge.service.auth import Caller
from tuneforge.service.base_models import display_name
from tuneforge.service.db import Checkpoint, Database, Event, File, Job, Project, insert_ignore, new_id, now
from tuneforge.service.errors import APIError
from tuneforge.service.executors.base import Executor, Launch
from tuneforge.service.files import add_file, file_path
from tuneforge.service.follow import RunFollower, results_csv
from tuneforge.service.models import start_model
from tuneforge.service.schemas import JobCreate
from tuneforge.service.settings import Settings

log = logging.getLogger("tuneforge.service.scheduler")

ACTIVE = ("running",)
STOP_GRACE_S = 15.0
MAX_ATTEMPTS = 3


def add_event(
    s: Session,
    job: Job,
    key: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    insert_ignore(
        s, Event, job_pk=job.pk, key=key, level=level, type=type, message=message, data=data, created_at=now()
    )


def fine_tuned_name(job: Job, project: str) -> str:
    """``ft:BASE:PROJECT:SUFFIX:JOBID`` (OpenAI's shape; the suffix part is empty without one)."""
    return f"ft:{display_name(job.model)}:{project}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"


class Scheduler:
    def __init__(self, db: Database, settings: Settings, executor: Executor) -> None:
        self.db, self.settings, self.executor = db, settings, executor
        self.followers: dict[str, RunFollower] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuneforge-scheduler", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; job processes keep running (a restarted server re-attaches them)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")  # the next tick retries; a bad job must not stop the rest
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        self._validate()
        self._stop_requested()
        self._follow()
        self._place()

    # -- 1. validation -----------------------------------------------------------------------------
    def _validate(self) -> None:
        with self.db.session() as s:
            pks = list(s.scalars(select(Job.pk).where(Job.status == "validating_files").order_by(Job.pk)))
        for pk in pks:
            try:
                self._validate_one(pk)
            except APIError as e:
                self._fail(pk, "invalid_training_file" if e.param else "invalid_request", e.message, e.param)
            except TuneforgeError as e:
                self._fail(pk, "invalid_request", str(e), None)
            except Exception:  # a bug: this job fails visibly instead of blocking the queue forever
                log.exception("validating job %s failed", pk)
                self._fail(pk, "internal_error", "the server failed to prepare this job (see its log)", None)

    def _validate_one(self, pk: int) -> None:
        from tuneforge.data.validate import validate_file

        with self.db.session() as s:
            job = s.get(Job, pk)
            assert job is not None
            project = s.get(Project, job.project_pk)
            assert project is not None
            body = JobCreate.model_validate(job.request)
            add_event(s, job, "validating", "Validating training file")
        plan = mapping.plan_request(body)
        spec = plan.spec
        ids = {"training_file": body.training_file, "validation_file": body.validation_file}
        ids.update(
            {f"tuneforge.mixture[{i}].file": m.file for i, m in enumerate(body.tuneforge.mixture)}
            if body.tuneforge
            else {}
        )
        paths: dict[str, str] = {}
        n_examples = 0
        fmt = spec.default_format or "auto"
        for param, fid in ids.items():
            if fid is None:
                continue
            with self.db.session() as s:
                row = s.scalar(select(File).where(File.id == fid))
            if row is None:  # deleted since the job was created
                raise APIError(400, f"{param}: file {fid} no longer exists", param=param)
            path = file_path(self.settings, fid, row.filename)
            report = validate_file(path, fmt, allow_extra="*" if spec.allow_extra_keys else ())
            if report.issues:
                first = replace(report.issues[0], path=fid)
                more = f" (and {len(report.issues) - 1} more issue(s))" if len(report.issues) > 1 else ""
                raise APIError(400, f"{param} {first}{more}", param=param)
            if report.format not in spec.formats:
                raise APIError(
                    400,
                    f"{param} {fid}: holds {report.format} records, but method {spec.name} trains on "
                    f"{' / '.join(spec.formats)} records",
                    param=param,
                )
            paths[fid] = str(path)
            if param == "training_file":
                n_examples = len(report.examples)
                fmt = report.format or fmt  # the other files must hold the same format
        model_path = start_model(self.db, Caller(project.pk, project.name), body.model)
        workdir = self.settings.jobs_dir / self._job_id(pk)
        tracking: dict[str, Any] = {"enabled": self.settings.tracking, "experiment": f"project-{project.name}"}
        if self.settings.tracking_uri:
            tracking["uri"] = self.settings.tracking_uri
        with self.db.session() as s:
            job = s.get(Job, pk)
            assert job is not None
            tracking["run_name"] = job.id
            recipe, hyper = mapping.build_recipe(
                body,
                plan,
                job_id=job.id,
                model_path=model_path,
                files=paths,
                n_examples=n_examples,
                run_dir=workdir / "run",
                seed=job.seed,
                tracking=tracking,
                gpu=_has_gpu(),
            )
            mapping.check_recipe(recipe)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            batch, epochs = int(hyper["batch_size"]), float(hyper["n_epochs"])
            n_train = n_examples if body.validation_file else max(1, int(n_examples * 0.95))
            total = recipe["train"].get("max_steps") or max(1, int(max(1, n_train // batch) * epochs))
            job.recipe, job.hyperparameters, job.run_dir, job.total_steps = recipe, hyper, str(workdir / "run"), total
            if job.status == "validating_files":
                job.status = "queued"
                add_event(s, job, "validated", "Files validated, moving job to queued state")
        self.wake()

    def _job_id(self, pk: int) -> str:
        with self.db.session() as s:
            job = s.get(Job, pk)
            assert job is not None
            return job.id

    def _fail(self, pk: int, code: str, message: str, param: str | None) -> None:
        with self.db.session() as s:
            job = s.get(Job, pk)
            if job is None or job.status in ("succeeded", "failed", "cancelled"):
                return
            job.status, job.finished_at = "failed", now()
            job.error = {"code": code, "message": message, "param": param}
            job.replicas = 0
            add_event(s, job, "failed", f"Fine-tuning job failed: {message}", level="error")

    # -- 2. stop requests --------------------------------------------------------------------------
    def _stop_requested(self) -> None:
        with self.db.session() as s:
            jobs = list(s.scalars(select(Job).where(Job.requested == "stop")))
        for job in jobs:
            handle = dict(job.handle or {})
            state = self.executor.status(handle).state if handle else "lost"
            with self.db.session() as s:
                row = s.get(Job, job.pk)
                assert row is not None
                if state != "running":
                    self._drain(s, row)  # the steps it made before it stopped are events too
                    row.requested, row.replicas = None, 0
                    row.handle = {**handle, "stopped": True}
                    self.followers.pop(row.id, None)
                    continue
                first = handle.get("stop_sent")
                if first is None:
                    self.executor.stop(handle)
                    handle["stop_sent"] = time.time()
                elif time.time() - first > STOP_GRACE_S and not handle.get("killed"):
                    self.executor.stop(handle, force=True)
                    handle["killed"] = True
                row.handle = handle

    # -- 3. follow ---------------------------------------------------------------------------------
    def _follow(self) -> None:
        with self.db.session() as s:
            jobs = list(s.scalars(select(Job).where(Job.status == "running", Job.requested.is_(None))))
        for job in jobs:
            handle = dict(job.handle or {})
            status = self.executor.status(handle)
            with self.db.session() as s:
                row = s.scalar(select(Job).where(Job.pk == job.pk).with_for_update())
                if row is None or row.status != "running" or row.requested is not None:
                    continue
                self._drain(s, row)
                self._apply_scale(s, row)
                if status.state == "exited":
                    self._finish(s, row, status.returncode or 0)
                elif status.state == "lost":
                    self._lost(s, row)

    def _drain(self, s: Session, job: Job) -> None:
        """New events and checkpoints of `job`'s run directory, into the database."""
        if not job.run_dir:
            return
        follower = self.followers.setdefault(job.id, RunFollower(Path(job.run_dir)))
        seen = follower.poll(job.total_steps)
        for event in seen.events:
            add_event(s, job, **event)
        if seen.last_step > job.last_step:
            job.last_step = seen.last_step
        for step, path in seen.checkpoints:
            model = f"{fine_tuned_name(job, self._project(s, job))}:ckpt-step-{step}"
            added = insert_ignore(
                s,
                Checkpoint,
                id=new_id("ftckpt"),
                job_pk=job.pk,
                step=step,
                metrics=follower.metrics_at(step),
                path=str(path),
                model=model,
                created_at=now(),
            )
            if added:
                add_event(s, job, f"checkpoint:{step}", f"Checkpoint created at step {step}")
                _record_name(model, path, job, step)

    def _project(self, s: Session, job: Job) -> str:
        project = s.get(Project, job.project_pk)
        assert project is not None
        return project.name

    def _apply_scale(self, s: Session, job: Job) -> None:
        handle = dict(job.handle or {})
        if not job.elastic or handle.get("applied") == job.replicas or not job.run_dir:
            return
        if self.executor.scale(handle, Path(job.run_dir), job.replicas):
            previous = handle.get("applied", handle.get("initial"))
            handle["applied"] = job.replicas
            handle["scales"] = n = int(handle.get("scales", 0)) + 1
            reason = handle.pop("reason", "")
            add_event(
                s,
                job,
                f"scale:{job.attempts}:{n}",
                f"Resized from {previous} to {job.replicas} replica(s){reason}",
                data={"previous": previous, "replicas": job.replicas},
            )
            job.handle = handle

    def _finish(self, s: Session, job: Job, returncode: int) -> None:
        run_dir = Path(job.run_dir or ".")
        if returncode == 0 and (run_dir / "result.json").exists():
            out = _output_dir(run_dir)
            job.status, job.finished_at, job.replicas = "succeeded", now(), 0
            job.fine_tuned_model = fine_tuned_name(job, self._project(s, job))
            job.output_dir = str(out)
            job.trained_tokens = sum(int(r.get("tokens", 0)) for r in self.followers[job.id].rows.values())
            csv = results_csv(run_dir)
            result = add_file(s, self.settings, job.project_pk, "step_metrics.csv", "fine-tune-results", csv.encode())
            job.result_files = [result.id]
            step = job.last_step or job.total_steps or 0
            insert_ignore(
                s,
                Checkpoint,
                id=new_id("ftckpt"),
                job_pk=job.pk,
                step=step,
                metrics=self.followers[job.id].metrics_at(step),
                path=str(out),
                model=f"{job.fine_tuned_model}:ckpt-step-{step}",
                created_at=now(),
            )
            _record_name(job.fine_tuned_model, out, job)
            _record_name(f"{job.fine_tuned_model}:ckpt-step-{step}", out, job, step)
            add_event(s, job, "model", f"New fine-tuned model created: {job.fine_tuned_model}")
            add_event(s, job, "succeeded", "The job has successfully completed")
            self.followers.pop(job.id, None)
            return
        message = _error_line(self.executor.log_tail(job.handle or {})) or f"training exited with status {returncode}"
        job.status, job.finished_at, job.replicas = "failed", now(), 0
        job.error = {"code": "training_failed", "message": message, "param": None}
        add_event(s, job, "failed", f"Fine-tuning job failed: {message}", level="error")
        self.followers.pop(job.id, None)

    def _lost(self, s: Session, job: Job) -> None:
        """The process vanished without an exit status (killed with its runner): resume it from its checkpoint."""
        if job.attempts >= MAX_ATTEMPTS:
            job.status, job.finished_at, job.replicas = "failed", now(), 0
            job.error = {"code": "job_lost", "message": f"the job's process died {job.attempts} times", "param": None}
            add_event(s, job, "failed", f"Fine-tuning job failed: {job.error['message']}", level="error")
            return
        job.status, job.replicas = "queued", 0
        add_event(
            s,
            job,
            f"lost:{job.attempts}",
            "The job's process stopped unexpectedly; resuming from its last checkpoint",
            level="warn",
        )

    # -- 4. placement ------------------------------------------------------------------------------
    def _place(self) -> None:
        with self.db.session() as s:
            busy = list(s.scalars(select(Job).where(Job.replicas > 0)))
            queued = list(s.scalars(select(Job).where(Job.status == "queued").order_by(Job.priority.desc(), Job.pk)))
        free = self.settings.slots - sum(j.replicas for j in busy)
        waiting = False
        for job in queued:
            if job.requested is not None or (job.handle and not job.handle.get("stopped") and self._alive(job)):
                continue  # its previous process is still going away
            need = job.replicas_min if job.elastic else 1
            if free < need:
                free += self._shrink_for(job, need - free, busy)
            if free < need:
                waiting = True
                break  # strict priority: nothing lower jumps the queue
            n = min(job.replicas_max, free) if job.elastic else 1
            if self._launch(job, n):
                free -= n
        if not waiting and free > 0:
            self._regrow(free)

    def _alive(self, job: Job) -> bool:
        return self.executor.status(dict(job.handle or {})).state == "running"

    def _shrink_for(self, job: Job, short: int, busy: list[Job]) -> int:
        """Free up to `short` slots from running elastic jobs of lower priority (lowest first); returns how many."""
        freed = 0
        victims = sorted(
            (j for j in busy if j.elastic and j.status == "running" and j.priority < job.priority),
            key=lambda j: (j.priority, -j.pk),
        )
        available = sum(j.replicas - j.replicas_min for j in victims)
        if available < short:
            return 0  # shrinking would not make room: leave them alone
        for victim in victims:
            if freed >= short:
                break
            take = min(victim.replicas - victim.replicas_min, short - freed)
            if take <= 0:
                continue
            with self.db.session() as s:
                row = s.scalar(select(Job).where(Job.pk == victim.pk).with_for_update())
                assert row is not None
                row.replicas -= take
                row.handle = {**(row.handle or {}), "reason": f" to make room for {job.id} (priority {job.priority})"}
                self._apply_scale(s, row)  # now, so the shrink is asked for (and logged) before the newcomer starts
                victim.replicas = row.replicas
            freed += take
        return freed

    def _regrow(self, free: int) -> None:
        with self.db.session() as s:
            jobs = list(
                s.scalars(
                    select(Job)
                    .where(Job.status == "running", Job.elastic.is_(True), Job.requested.is_(None))
                    .order_by(Job.priority.desc(), Job.pk)
                )
            )
            for job in jobs:
                if free <= 0:
                    break
                grow = min(free, job.replicas_max - job.replicas)
                if grow > 0:
                    job.replicas += grow
                    job.handle = {**(job.handle or {}), "reason": " as capacity freed up"}
                    free -= grow

    def _launch(self, job: Job, replicas: int) -> bool:
        assert job.run_dir is not None
        run_dir = Path(job.run_dir)
        resume = any((run_dir / "checkpoints").glob("step-*")) and not job.elastic
        launch = Launch(
            job_id=job.id,
            recipe=run_dir.parent / "recipe.yaml",
            run_dir=run_dir,
            workdir=run_dir.parent,
            replicas=f"{job.replicas_min}:{replicas}" if job.elastic else None,
            resume=resume,
            env={"TUNEFORGE_JOB_ID": job.id},
        )
        with self.db.session() as s:
            row = s.scalar(select(Job).where(Job.pk == job.pk).with_for_update())
            if row is None or row.status != "queued":
                return False
            handle = self.executor.start(launch)
            handle.update(initial=replicas, applied=replicas)
            row.handle, row.replicas, row.status = handle, replicas, "running"
            row.attempts += 1
            row.started_at = row.started_at or now()
            what = "resumed from its last checkpoint" if resume else "started"
            add_event(
                s,
                row,
                f"started:{row.attempts}",
                f"Fine-tuning job {what}" + (f" on {replicas} replica(s)" if job.elastic else ""),
            )
        return True


@functools.cache
def _has_gpu() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    import torch

    return torch.cuda.is_available()


def _record_name(name: str, path: Path, job: Job, step: int | None = None) -> None:
    """Index a fine-tuned model name so that eval, serve and train resolve it without the service."""
    try:
        fine_tuned.record(name, path, job=job.id, base=job.model, step=step)
    except (OSError, TuneforgeError) as e:  # the job's result stands; only ``ft:`` references to it would fail
        log.warning("could not record %s in the fine-tuned model index: %s", name, e)


def _output_dir(run_dir: Path) -> Path:
    for candidate in (
        run_dir / "adapter",
        run_dir / "model",
        run_dir / "final" / "adapter",
        run_dir / "final" / "model",
    ):
        if candidate.is_dir():
            return candidate
    return run_dir


def _error_line(log_text: str) -> str | None:
    """The CLI's ``error: …`` message (a user error) from a job's log, with what follows it; None if absent."""
    lines = log_text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return "\n".join([lines[i].removeprefix("error: "), *lines[i + 1 : i + 6]]).strip()
    tail = [line for line in lines if line.strip()][-3:]
    return "\n".join(tail) if tail else None
