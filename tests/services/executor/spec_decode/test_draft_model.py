"""DraftModelProposer: greedy drafts equal the draft model's own greedy continuation (the
transformers reference), batched over requests of different lengths, across partial
acceptance and rejection (its self-rollback), within max_drafts, max_model_len and the
request's blocks; a draft of another tokenizer is refused at start-up. Tiny models, fp32."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.executor.attention import get_attention_backend
from services.executor.input_batch import RequestState
from services.executor.loader import resolve_model
from services.executor.sampler import SamplingState
from services.executor.spec_decode.draft_model import DraftModelProposer
from shared.config import ConfigError, EngineConfig
from shared.sampling_params import SamplingParams
from tests.services.executor.hf_tokens import hf_greedy_no_eos
from tests.tiny_models import make_tiny_model

VOCAB = 256
BLOCK = 4
K = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from threads; on a shared 2-core machine they only stall.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def small_draft_dir(tmp_path_factory) -> Path:
    # Another architecture and shape, the same vocabulary.
    return make_tiny_model(
        "qwen3",
        tmp_path_factory.mktemp("draft"),
        seed=1,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=1,
    )


def make_proposer(target: Path, draft: Path, *, max_model_len: int = 128, num_blocks: int = 128, **kw):
    config = EngineConfig(
        model=str(target),
        dtype="float32",
        block_size=BLOCK,
        speculative_config={"model": str(draft), "num_speculative_tokens": K},
        **kw,
    )
    proposer = DraftModelProposer(
        config,
        config.speculative(),
        target=resolve_model(str(target)),
        target_vocab_size=VOCAB,
        max_model_len=max_model_len,
        block_size=BLOCK,
        device=torch.device("cpu"),
        dtype=torch.float32,
        attn_backend=get_attention_backend("torch", torch.device("cpu")),
    )
    proposer.allocate(num_blocks)
    return proposer


class Blocks:
    """Hands out block ids in a shuffled order, so tables are not just 0, 1, 2, ..."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken


def request(req_id: str, token_ids: list[int], block_ids: list[int], num_computed: int) -> RequestState:
    prompt = list(token_ids)
    return RequestState(
        req_id=req_id,
        token_ids=list(token_ids),
        block_ids=list(block_ids),
        num_computed_tokens=num_computed,
        sampling=SamplingState(SamplingParams(temperature=0.0), prompt, []),
    )


def blocks_for(num_positions: int) -> int:
    return -(-num_positions // BLOCK)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def other_than(token: int) -> int:
    return 3 + (token - 3 + 17) % (VOCAB - 3)


def test_self_draft_matches_target_greedy_across_acceptance_and_rejection(target_dir):
    """Draft = target: drafts are the target's own greedy continuation, after the first
    proposal (whole prompts, cut into pieces of the 8-token budget) and after each way the
    target can answer it: partial acceptance, full acceptance + bonus, rejection followed by
    a step without proposals (two tokens the draft never saw), and a prefix-cache hit."""
    proposer = make_proposer(target_dir, target_dir, max_num_batched_tokens=8)
    rng = random.Random(0)
    blocks = Blocks(128)
    prompts = [random_prompt(rng, n) for n in (3, 9, 17)]
    ref = hf_greedy_no_eos(target_dir, prompts, 1 + 2 * K + 2)
    reqs = [
        request(f"r{i}", p + r[:1], blocks.take(blocks_for(len(p) + 3 * K + 4)), 0)
        for i, (p, r) in enumerate(zip(prompts, ref, strict=True))
    ]
    assert proposer.propose(reqs, [K] * 3) == [r[1 : 1 + K] for r in ref]
    assert proposer.num_computed_tokens == sum(len(p) + 1 + K - 1 for p in prompts)

    # r0: d1, d2 accepted, d3 rejected for X. r1: all K accepted + bonus. r2: d1 rejected
    # for Y, then a step without drafts sampled W.
    p0, p1, p2 = prompts
    r0, r1, r2 = ref
    x, y = other_than(r0[3]), other_than(r2[1])
    reqs[0].token_ids = p0 + r0[:3] + [x]
    reqs[1].token_ids = p1 + r1[: 2 + K]
    reqs[2].token_ids = p2 + r2[:1] + [y, 5]
    for r, p in zip(reqs, prompts, strict=True):
        r.num_computed_tokens = len(p) + 1
    expected = hf_greedy_no_eos(target_dir, [r.token_ids for r in reqs], K)
    assert proposer.propose(reqs, [K] * 3) == expected

    # A prefix-cache hit: r3 shares r2's first two full blocks (their draft KV was written
    # for r2) and arrives with num_computed_tokens = 8; the draft computes from there.
    p3 = p2[:8] + random_prompt(rng, 5)
    r3 = request("r3", p3, reqs[2].block_ids[:2] + blocks.take(blocks_for(len(p3) + K) - 2), 8)
    proposer.add(r3)
    before = proposer.num_computed_tokens
    assert proposer.propose([r3], [K]) == hf_greedy_no_eos(target_dir, [p3], K)
    assert proposer.num_computed_tokens - before == len(p3) - 8 + K - 1


def test_small_draft_limits_and_writes(target_dir, small_draft_dir):
    """A draft of another shape: each request gets min(max_drafts, what fits) drafts, equal
    to the draft model's own greedy continuation; the draft KV is written exactly at
    positions 0 .. L + n - 2 of each proposing request and nowhere else (nothing at or past
    max_model_len, nothing for a request with max_drafts 0)."""
    max_model_len = 24
    proposer = make_proposer(target_dir, small_draft_dir, max_model_len=max_model_len, num_blocks=64)
    rng = random.Random(1)
    blocks = Blocks(64, seed=1)
    lens = [6, 11, 9, 22, 10]
    want = [0, 1, K, K, K]
    reqs = []
    for i, n in enumerate(lens):
        num_blocks = 3 if i == 4 else blocks_for(n + K)  # r4: lookahead for 3 drafts only
        reqs.append(request(f"r{i}", random_prompt(rng, n), blocks.take(num_blocks), n - 1))
    got = proposer.propose(reqs, want)

    # r3 stops at max_model_len (positions 22, 23); r4 at its blocks (positions 10, 11, 12
    # hold drafts 1-3; the draft writes up to 11).
    fits = [0, 1, K, max_model_len - 22, 3]
    assert [len(g) for g in got] == fits
    expected = hf_greedy_no_eos(small_draft_dir, [r.token_ids for r in reqs], K)
    assert got == [e[:n] for e, n in zip(expected, fits, strict=True)]

    k_cache = proposer.kv_caches[0][0]
    written = k_cache.abs().flatten(2).sum(-1).flatten() != 0  # per slot
    want_written = np.zeros(written.numel(), dtype=bool)
    for r, n in zip(reqs, fits, strict=True):
        if n == 0:
            continue
        pos = np.arange(len(r.token_ids) + n - 1)
        table = np.asarray(r.block_ids)
        want_written[table[pos // BLOCK] * BLOCK + pos % BLOCK] = True
    assert np.array_equal(written.numpy(), want_written)


def test_blocks_too_few_for_the_known_tokens(target_dir, small_draft_dir):
    proposer = make_proposer(target_dir, small_draft_dir, num_blocks=8)
    r = request("r", list(range(3, 12)), [0, 1], 8)  # 9 tokens, room for 8
    with pytest.raises(ValueError, match="lookahead"):
        proposer.propose([r], [K])


def test_remove_forgets_the_request(target_dir, small_draft_dir):
    """A request id reused after remove() starts from scratch: nothing it fed before (its
    fed positions, its drafts) is trusted for the new token history."""
    proposer = make_proposer(target_dir, small_draft_dir)
    rng = random.Random(2)
    block_ids = Blocks(128, seed=2).take(blocks_for(20 + K))
    first = request("r", random_prompt(rng, 12), block_ids, 11)
    proposer.propose([first], [K])
    proposer.remove("r")
    proposer.remove("never-seen")  # finished ids may name requests it never drafted for
    again = request("r", random_prompt(rng, 16), block_ids, 0)  # preempted: back as new
    assert proposer.propose([again], [K]) == hf_greedy_no_eos(small_draft_dir, [again.token_ids], K)


@pytest.mark.parametrize("added", [False, True])
def test_chunked_prompt_is_fed_whole(target_dir, small_draft_dir, added):
    """A prompt the target prefilled in chunks is first proposed for with
    num_computed_tokens = 12 (its last chunk was 12..15): the draft never saw 0..11, so it
    feeds them, whether or not add() pinned the (empty) prefix-cache hit at arrival."""
    proposer = make_proposer(target_dir, small_draft_dir)
    r = request("r", random_prompt(random.Random(3), 16), Blocks(128, seed=3).take(blocks_for(16 + K)), 0)
    if added:
        proposer.add(r)
    r.num_computed_tokens = 12
    assert proposer.propose([r], [K]) == hf_greedy_no_eos(small_draft_dir, [r.token_ids], K)
    assert proposer.num_computed_tokens == 16 + K - 1


# ---------------------------------------------------------------------- tokenizer check
def _write_tokenizer(folder: Path, variant: str) -> None:
    """A 256-token BPE tokenizer.json: 250 characters + 6 merges; `variant` changes one thing."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    chars = [chr(0x100 + i) for i in range(250)]
    merges = [(chars[2 * i], chars[2 * i + 1]) for i in range(6)]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if variant == "merges":  # the same tokens, merged in another order
        merges[3], merges[4] = merges[4], merges[3]
    if variant == "vocab":
        vocab[chars[0]], vocab[chars[1]] = vocab[chars[1]], vocab[chars[0]]
    Tokenizer(BPE(vocab=vocab, merges=merges)).save(str(folder / "tokenizer.json"))


def _with_tokenizer(src: Path, dst: Path, variant: str) -> Path:
    shutil.copytree(src, dst)
    _write_tokenizer(dst, variant)
    return dst


def test_draft_with_another_vocab_size_is_refused(target_dir, tmp_path):
    draft = make_tiny_model("llama", tmp_path / "big-vocab", vocab_size=300, num_hidden_layers=1)
    with pytest.raises(ConfigError) as e:
        make_proposer(target_dir, draft)
    msg = str(e.value)
    assert "vocab sizes (300 vs 256)" in msg and str(draft) in msg and str(target_dir) in msg


@pytest.mark.parametrize(
    ("variant", "says"),
    [
        ("merges", "merges differ (6 vs 6; merge #3 is"),
        ("vocab", "vocab differs (256 vs 256 entries; token 'Ā' has id 1 in the draft, 0 in the target)"),
    ],
)
def test_draft_with_another_tokenizer_is_refused(target_dir, small_draft_dir, tmp_path, variant, says):
    target = _with_tokenizer(target_dir, tmp_path / "target", "same")
    draft = _with_tokenizer(small_draft_dir, tmp_path / "draft", variant)
    with pytest.raises(ConfigError) as e:
        make_proposer(target, draft)
    msg = str(e.value)
    assert says in msg and str(draft) in msg and str(target) in msg and "tokenizer" in msg


def test_draft_with_the_same_tokenizer_is_accepted(target_dir, small_draft_dir, tmp_path):
    target = _with_tokenizer(target_dir, tmp_path / "target", "same")
    draft = _with_tokenizer(small_draft_dir, tmp_path / "draft", "same")
    proposer = make_proposer(target, draft)
    assert proposer.kv_spec.num_layers == 1 and proposer.kv_spec.num_kv_heads == 1
    assert proposer.kv_spec.head_dim == 16 and proposer.kv_spec.block_size == BLOCK
