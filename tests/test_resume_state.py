"""What a checkpoint holds beyond the weights: the data stream's position (global, with the world
size), every rank's RNG states, rank-distinct loader seeds and the teacher's identity."""

import hashlib
import itertools
import random
import types

import numpy as np
import pytest
import torch
from torch import nn

from kd import engine, resume_state
from kd.resume_state import ResumableTrainingSampler, TrainingStateHook
from kd.teacher import TeacherError

pytestmark = pytest.mark.usefixtures("rng_left_as_found")


def _as_rank(monkeypatch, rank: int, world: int, gathered=None) -> None:
    """Make kd.resume_state see itself as rank ``rank`` of ``world`` (all_gather answers
    ``gathered``)."""
    monkeypatch.setattr(resume_state.comm, "get_rank", lambda: rank)
    monkeypatch.setattr(resume_state.comm, "get_world_size", lambda: world)
    monkeypatch.setattr(resume_state.comm, "is_main_process", lambda: rank == 0)
    if gathered is not None:
        monkeypatch.setattr(resume_state.comm, "all_gather", lambda data: gathered(data))


def _sampler(rank: int, world: int) -> ResumableTrainingSampler:
    sampler = ResumableTrainingSampler(10, seed=5)
    sampler._rank, sampler._world_size = rank, world
    return sampler


def _hook(sampler, iteration: int, images_per_batch: int = 4, teacher: str = "", allow=False):
    hook = TrainingStateHook(sampler, images_per_batch, 0, teacher, allow)
    hook.trainer = types.SimpleNamespace(iter=iteration, max_iter=100, model=nn.Linear(1, 1))
    return hook


def _next(sampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


# The stream every world size draws from: TrainingSampler's shuffles of seed 5.
STREAM = _next(_sampler(0, 1), 40)


@pytest.mark.parametrize("saved_world, resumed_world", [(1, 2), (2, 1), (2, 2)])
def test_sampler_position_continues_the_stream_with_another_world_size(
    monkeypatch, saved_world, resumed_world
):
    # Saved after iteration 2 (3 iterations of 4 images): the stream's first 12 indices are used.
    _as_rank(monkeypatch, 0, saved_world, gathered=lambda d: [d] * saved_world)
    state = _hook(_sampler(0, saved_world), iteration=2).state_dict()
    assert state["consumed_images"] == 12 and state["world_size"] == saved_world
    per_rank = []
    for rank in range(resumed_world):
        _as_rank(monkeypatch, rank, resumed_world)
        sampler = _sampler(rank, resumed_world)
        _hook(sampler, iteration=0).load_state_dict(state)
        per_rank.append(_next(sampler, 8 // resumed_world))
    # The next 8 images of the run, in stream order: rank r takes every world-th one.
    resumed = [per_rank[i % resumed_world][i // resumed_world] for i in range(8)]
    assert resumed == STREAM[12:20]


def test_checkpoint_of_the_old_format_resumes_as_before(monkeypatch):
    _as_rank(monkeypatch, 1, 2)
    torch.manual_seed(3)
    old = {
        "consumed_indices": 6,  # per rank, before the global count
        "rng_python": random.getstate(),
        "rng_numpy": resume_state._numpy_state_to_tensors(np.random.get_state()),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": [],
    }
    expected = torch.rand(3)
    sampler = _sampler(1, 2)
    _hook(sampler, 0).load_state_dict(old)
    assert torch.equal(torch.rand(3), expected)
    assert _next(sampler, 2) == [STREAM[13], STREAM[15]]


def _rank_states(world: int) -> list:
    """RNG states of ``world`` ranks, each seeded differently (as default_setup seeds SEED +
    rank), and what each rank draws from torch next."""
    states, draws = [], []
    for rank in range(world):
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        torch.manual_seed(100 + rank)
        states.append(resume_state._rng_state())
        draws.append((random.random(), float(np.random.rand()), torch.rand(2)))
    return states, draws


@pytest.mark.parametrize("resumed_world", [2, 1, 3])
def test_each_rank_restores_its_own_rng_state(monkeypatch, caplog, resumed_world):
    """Issue 25.3: rank 0's state was restored on every rank, and resuming with fewer processes
    raised an IndexError."""
    states, draws = _rank_states(2)
    _as_rank(monkeypatch, 0, 2, gathered=lambda d: states)
    hook = _hook(_sampler(0, 2), iteration=4)
    hook.gather()
    saved = hook.state_dict()
    for rank in range(resumed_world):
        _as_rank(monkeypatch, rank, resumed_world)
        resumed = _hook(_sampler(rank, resumed_world), 0)
        torch.manual_seed(999)  # what a rank without a saved state keeps
        unsaved = torch.rand(2)
        torch.manual_seed(999)
        with caplog.at_level("WARNING", logger="kd.resume_state"):
            caplog.clear()
            resumed.load_state_dict(saved)
        drawn = (random.random(), float(np.random.rand()), torch.rand(2))
        if rank < 2:
            assert drawn[:2] == draws[rank][:2] and torch.equal(drawn[2], draws[rank][2])
        else:
            assert torch.equal(drawn[2], unsaved)
        lines = [r.getMessage() for r in caplog.records]
        if resumed_world == 2 or rank > 0:
            assert not lines
        else:  # the main process says once what could not be restored
            assert len(lines) == 1 and "saved with 2" in lines[0]
            assert ("ranks 2-2" if resumed_world == 3 else "ranks 1-1") in lines[0]


def test_loader_worker_seeds_differ_across_ranks(monkeypatch):
    """Issue 25.2: every rank's loader generator was seeded from the sampler's shared seed."""
    seeds = []
    for rank in range(2):
        monkeypatch.setattr(engine.comm, "get_rank", lambda r=rank: r)
        loader = torch.utils.data.DataLoader(list(range(4)), num_workers=0)
        engine._give_loaders_own_generators(loader, seed=5)
        seeds.append(loader.generator.initial_seed())
    assert seeds[0] != seeds[1]
    # Deterministic: the same rank gets the same seed again.
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=0)
    engine._give_loaders_own_generators(loader, seed=5)
    assert loader.generator.initial_seed() == seeds[1]


def test_resume_with_another_teacher_stops_unless_allowed(monkeypatch, caplog):
    _as_rank(monkeypatch, 0, 1, gathered=lambda d: [d])
    saved = _hook(_sampler(0, 1), 3, teacher="a" * 64).state_dict()
    with pytest.raises(TeacherError, match=r"another teacher.*KD.TEACHER.ALLOW_CHANGE"):
        _hook(_sampler(0, 1), 0, teacher="b" * 64).load_state_dict(saved)
    _hook(_sampler(0, 1), 0, teacher="a" * 64).load_state_dict(saved)  # the same: fine
    with caplog.at_level("WARNING", logger="kd.resume_state"):
        _hook(_sampler(0, 1), 0, teacher="b" * 64, allow=True).load_state_dict(saved)
    assert any("another teacher" in r.getMessage() for r in caplog.records)


def test_a_hugging_face_teachers_weights_identify_it(tmp_path):
    """A resume with another hf:// teacher folder was not caught: KD.TEACHER.WEIGHTS is empty for
    them, and only that file was hashed. Now the folder's weights file is."""
    from detectron2.config import CfgNode

    digests = []
    for name, content in (("a", b"teacher one"), ("b", b"teacher two")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(content)
        cfg = CfgNode({"KD": {"TEACHER": {"WEIGHTS": "", "CONFIG_FILE": f"hf://{folder}"}}})
        distiller = torch.nn.Module()
        object.__setattr__(distiller, "teacher", torch.nn.Module())
        digests.append(engine._teacher_sha256(cfg, distiller))
        assert digests[-1] == hashlib.sha256(content).hexdigest()
    assert digests[0] != digests[1]
    plain = CfgNode({"KD": {"TEACHER": {"WEIGHTS": "", "CONFIG_FILE": ""}}})
    assert engine._teacher_sha256(plain, torch.nn.Linear(1, 1)) == ""  # not a distiller
