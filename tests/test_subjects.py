import pytest

from nebula import subjects
from nebula.errors import InvalidRequest

NAMES = [
    "sim-chat",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "llama3:8b",
    "a.b",
    "x*y>z",
    "with space",
    "under_score",
    "ünïcode-模型",
]


@pytest.mark.parametrize("name", NAMES)
def test_model_token_roundtrip_and_safe(name: str) -> None:
    tok = subjects.model_token(name)
    assert subjects.model_from_token(tok) == name
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in tok)
    subj = subjects.req_subject(name)
    assert subj.count(".") == 3 and "*" not in subj and ">" not in subj and " " not in subj


def test_distinct_names_distinct_tokens() -> None:
    toks = {subjects.model_token(n) for n in [*NAMES, "a_2Eb", "a-b"]}
    assert len(toks) == len(NAMES) + 2


def test_empty_model_rejected() -> None:
    with pytest.raises(InvalidRequest):
        subjects.model_token("")


def test_placement_key_roundtrip() -> None:
    key = subjects.placement_key("Qwen/Qwen2.5-0.5B", 3)
    assert subjects.placement_key_parts(key) == ("Qwen/Qwen2.5-0.5B", 3)
