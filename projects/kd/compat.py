"""The one place that knows about detectron2 versions.

Everything here is feature-detected and inert on a current official detectron2 built with its
compiled ``detectron2._C``. It covers what the pure-Python detectron2 v0.6 snapshot
(``pb1-detectron2``) lacks on today's Python and PyTorch:

* a stand-in for ``detectron2._C`` (:func:`install_import_hook`), put in place for every
  interpreter of the project's environment by a ``.pth`` file that ``make setup`` writes. It
  answers the version queries of ``collect_env_info`` and raises a clear error naming any compiled
  op that is called;
* a fast COCO evaluator when detectron2's compiled one is missing: faster-coco-eval where it is
  installed, pycocotools otherwise (:func:`install_fast_coco_eval`, :func:`build_coco_evaluator`);
* a launcher that runs ``--num-gpus N`` as N CPU processes over gloo when there is no CUDA
  (:func:`launch`);
* the optimizer and AMP grad-scaler state in checkpoints, which v0.6's ``DefaultTrainer`` does not
  save, so ``--resume`` would restart momentum from zero (:class:`TrainerStateMixin`);
* detectron2's ``TracingAdapter`` (``detectron2/export/flatten.py``) for ONNX and TorchScript
  export, whose package ``__init__`` imports caffe2 in v0.6 (:func:`tracing_adapter`);
* the ``MapDataset`` fallback that calls ``random.sample`` on a set (a ``TypeError`` since
  Python 3.11), and ``RetinaNetHead``'s ``get_norm(norm, 1)`` probe that makes
  ``MODEL.RETINANET.NORM "GN"`` raise (:func:`apply_runtime_fixes`, :func:`group_norm`).

This module imports only the standard library at import time: the ``.pth`` hook runs at every
interpreter start and must stay cheap.
"""

import collections.abc
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Callable, Iterable, List, Optional, Sequence

__all__ = [
    "has_compiled_ops",
    "install_import_hook",
    "apply_runtime_fixes",
    "group_norm",
    "install_fast_coco_eval",
    "build_coco_evaluator",
    "launch",
    "create_local_process_group",
    "TrainerStateMixin",
    "tracing_adapter",
]

_STUB_NAME = "detectron2._C"
_STUB_MARKER = "__kd_stand_in__"


def _make_stand_in() -> types.ModuleType:
    """Build the module that stands in for the missing compiled ``detectron2._C``."""
    module = types.ModuleType(_STUB_NAME)
    module.__doc__ = "Stand-in for detectron2's compiled extension, installed by kd.compat."
    setattr(module, _STUB_MARKER, True)

    def get_compiler_version() -> str:
        return "not compiled (pure-Python detectron2; kd.compat stand-in)"

    def get_cuda_version() -> str:
        return "not compiled"

    def has_cuda() -> bool:
        return False

    module.get_compiler_version = get_compiler_version
    module.get_cuda_version = get_cuda_version
    module.has_cuda = has_cuda

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(
            f"detectron2 compiled op '{name}' is not available: this detectron2 was installed "
            "without its C++/CUDA extension (detectron2._C). Rotated boxes, deformable "
            "convolution and the fast COCO evaluator need it. Install the official detectron2 "
            "from its repository (see docs/install.md, 'GPU users') to use this op."
        )

    module.__getattr__ = __getattr__
    return module


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _make_stand_in()

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _CompiledOpsFinder(importlib.abc.MetaPathFinder):
    """Answers ``import detectron2._C`` only when no real extension exists.

    It sits at the *end* of ``sys.meta_path``, so the normal path finder finds a real compiled
    extension first whenever one is installed.
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        if fullname != _STUB_NAME:
            return None
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader())


class _FixingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then the runtime fix for that module."""

    def __init__(self, loader: importlib.abc.Loader, fix: Callable[[], None]):
        self._loader = loader
        self._fix = fix

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._fix()


class _RuntimeFixFinder(importlib.abc.MetaPathFinder):
    """Applies :func:`apply_runtime_fixes`' fix of a module as soon as that module is imported,
    so that a script that imports detectron2 alone (without ``kd``) gets them too.

    It sits at the *front* of ``sys.meta_path``, finds the module with the other finders and only
    wraps its loader; every other import passes through untouched.
    """

    # A marker, not isinstance: this file may be loaded twice (by the .pth file and as kd.compat),
    # and two such finders must not ask each other in turn.
    _kd_runtime_fixes = True

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        fix = _FIXES_ON_IMPORT.get(fullname)
        if fix is None:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_kd_runtime_fixes", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _FixingLoader(spec.loader, fix)
                return spec
        return None


def install_import_hook() -> None:
    """Make ``import detectron2._C`` succeed without the compiled extension, and apply the
    runtime fixes to detectron2's modules as they are imported (:class:`_RuntimeFixFinder`).
    Idempotent. The ``.pth`` file ``make setup`` writes calls it at interpreter start."""
    if not any(isinstance(f, _CompiledOpsFinder) for f in sys.meta_path):
        sys.meta_path.append(_CompiledOpsFinder())
    if not any(getattr(f, "_kd_runtime_fixes", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RuntimeFixFinder())


def has_compiled_ops() -> bool:
    """Whether the real compiled ``detectron2._C`` is importable."""
    install_import_hook()
    import detectron2._C as ext  # noqa: F401  (resolved by the real extension or the stand-in)

    return not getattr(ext, _STUB_MARKER, False)


def apply_runtime_fixes() -> None:
    """Fix detectron2 v0.6 behaviours that break on current Python or for GroupNorm heads.

    Idempotent, feature-detected.
    """
    install_import_hook()
    _accept_whole_numbers_for_floats()
    _fix_retinanet_head_group_norm()
    _fix_map_dataset_fallback()


# The modules whose fix the import hook applies when they are imported (see apply_runtime_fixes).
_FIXES_ON_IMPORT: "dict[str, Callable[[], None]]" = {}


def _fix_map_dataset_fallback() -> None:
    """Make ``MapDataset``'s fallback work when its mapper returns None (e.g. an unreadable image).

    It keeps the fallback candidates in a set and draws one with ``random.sample``, which takes
    only sequences since Python 3.11 (a ``TypeError``). The candidates become a
    :class:`_FallbackCandidates`, a set that is also a sequence, so the same draw works.
    """
    import random

    from detectron2.data import common

    map_dataset = common.MapDataset
    if getattr(map_dataset, "_kd_fallback_fixed", False):
        return
    probe = map_dataset([0], lambda x: x)
    try:
        random.Random(0).sample(probe._fallback_candidates, k=1)
    except TypeError:
        original_init = map_dataset.__init__

        def __init__(self, dataset, map_func):
            original_init(self, dataset, map_func)
            if isinstance(self._fallback_candidates, set):
                self._fallback_candidates = _FallbackCandidates(self._fallback_candidates)

        map_dataset.__init__ = __init__
    except AttributeError:  # another detectron2 draws its fallback differently
        pass
    map_dataset._kd_fallback_fixed = True


def _accept_whole_numbers_for_floats() -> None:
    """Let a float config key take a whole number (``KD.TEACHER.MIN_AP 0``, ``BASE_LR: 1``).

    yacs refuses an int for a float key ("Type mismatch"), although the number is exactly
    representable; every other check of the value stays as yacs has it. Idempotent.
    """
    from yacs import config as yacs_config

    original = yacs_config._check_and_coerce_cfg_value_type
    if getattr(original, "_kd_fixed", False):
        return

    def check(replacement, original_value, key, full_key):
        if type(replacement) is int and type(original_value) is float:
            replacement = float(replacement)
        return original(replacement, original_value, key, full_key)

    check._kd_fixed = True
    yacs_config._check_and_coerce_cfg_value_type = check


def group_norm(channels: int) -> "torch.nn.GroupNorm":  # noqa: F821 (torch imported lazily)
    """detectron2's ``"GN"`` (32 groups) as a callable that also works for narrow heads.

    detectron2 v0.6's ``RetinaNetHead`` and ``FCOSHead`` probe their norm with ``get_norm(norm,
    1)``, which fails for ``GroupNorm(32, 1)``. Groups keep at least 2 channels, so that a 1x1 map
    (P7 of a small image, batch 1) can be normalised; from 64 channels on this is detectron2's
    ``GroupNorm(32, C)`` exactly (same parameters, so checkpoints match).
    """
    from torch import nn  # not at module level: the .pth loads this file before torch is wanted

    return nn.GroupNorm(max(1, min(32, channels // 2)), channels)


def _fix_retinanet_head_group_norm() -> None:
    """Make ``MODEL.RETINANET.NORM "GN"`` work: v0.6 raises in the ``get_norm(norm, 1)`` probe."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    if getattr(RetinaNetHead, "_kd_fixed", False):
        return
    original = RetinaNetHead.from_config.__func__

    def from_config(cls, cfg, input_shape):
        kwargs = original(cls, cfg, input_shape)
        if kwargs.get("norm") == "GN":
            kwargs["norm"] = group_norm
        return kwargs

    RetinaNetHead.from_config = classmethod(from_config)
    RetinaNetHead._kd_fixed = True


_FIXES_ON_IMPORT.update(
    {
        "yacs.config": _accept_whole_numbers_for_floats,
        "detectron2.data.common": _fix_map_dataset_fallback,
        "detectron2.modeling.meta_arch.retinanet": _fix_retinanet_head_group_norm,
    }
)


class _FallbackCandidates(collections.abc.Sequence):
    """The set of indices ``MapDataset`` may fall back to, as a sequence ``random.sample`` takes.

    ``add``, ``discard``, ``in`` and indexing are O(1): members sit in a list, and a discarded one
    is replaced by the last. One ``sample(k=1)`` draws ``randbelow(len)`` from the dataset's RNG,
    as it did on a set before Python 3.11.
    """

    def __init__(self, items: Iterable[int] = ()):
        self._items: List[int] = sorted(items)
        self._position = {item: i for i, item in enumerate(self._items)}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __contains__(self, item: object) -> bool:
        return item in self._position

    def add(self, item: int) -> None:
        if item not in self._position:
            self._position[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: int) -> None:
        i = self._position.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._position[last] = i


class TrainerStateMixin:
    """Put the inner trainer's state (optimizer, AMP grad scaler) into ``DefaultTrainer``'s
    checkpoints where detectron2 does not (v0.6). Mix in before ``DefaultTrainer``."""

    def state_dict(self) -> dict:
        ret = super().state_dict()
        if "_trainer" not in ret:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        from detectron2.engine import DefaultTrainer

        super().load_state_dict(state_dict)
        if "load_state_dict" not in vars(DefaultTrainer) and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])


def install_fast_coco_eval() -> bool:
    """Make ``COCOEvaluator(..., use_fast_impl=True)`` work; returns whether it does.

    With detectron2's compiled ``_C`` this is detectron2's own ``COCOeval_opt`` and nothing
    changes. Without it, detectron2's ``COCOeval_opt`` would call the missing extension; where
    the ``faster-coco-eval`` package is installed, its ``COCOeval_faster`` (a C++ port of the same
    algorithm that gives pycocotools' AP, checked in ``tests/test_coco_eval.py``) takes its place
    in ``detectron2.evaluation.coco_evaluation``, the module whose
    ``_evaluate_predictions_on_coco`` picks the class. Otherwise False: use pycocotools
    (``use_fast_impl=False``). Idempotent.
    """
    if has_compiled_ops():
        return True
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return False
    from detectron2.evaluation import coco_evaluation

    if not hasattr(coco_evaluation, "COCOeval_opt"):  # a detectron2 that picks its class otherwise
        return False
    current = coco_evaluation.COCOeval_opt
    if isinstance(current, type) and issubclass(current, COCOeval_faster):
        return True

    class FasterCOCOeval(COCOeval_faster):
        """faster-coco-eval's ``COCOeval`` built as detectron2 builds ``COCOeval_opt``, printing
        its progress and summary as pycocotools does."""

        def __init__(self, cocoGt=None, cocoDt=None, iouType: str = "segm"):
            super().__init__(cocoGt, cocoDt, iouType, print_function=print)

    coco_evaluation.COCOeval_opt = FasterCOCOeval
    return True


def build_coco_evaluator(dataset_name: str, output_dir: Optional[str] = None, **kwargs: Any):
    """``COCOEvaluator`` with the fastest COCO evaluation available.

    detectron2's compiled evaluator, else faster-coco-eval, else pycocotools
    (:func:`install_fast_coco_eval`); all three give the same AP.

    Args:
        dataset_name: a registered detectron2 dataset with COCO-format metadata.
        output_dir: where to write the predictions and ``coco_instances_results.json``.
        kwargs: passed to ``COCOEvaluator``.
    """
    from detectron2.evaluation import COCOEvaluator

    if "use_fast_impl" not in kwargs:
        kwargs["use_fast_impl"] = install_fast_coco_eval()
    return COCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)


_EXPORT_ALIAS = "_kd_detectron2_export"


def tracing_adapter() -> type:
    """detectron2's ``TracingAdapter`` class (flattens a detector's dict / ``Instances`` inputs and
    outputs into tensors for ``torch.jit.trace`` and ``torch.onnx.export``).

    ``detectron2.export`` imports caffe2 in v0.6 (no current torch has it); the official
    detectron2 today guards that import. Where the package fails to import, its ``flatten.py``
    (and the ``torchscript_patch.py`` it imports) are loaded from the package folder under a
    private package name, without the package ``__init__``; ``detectron2.export`` itself is left
    unimported.
    """
    try:
        from detectron2.export.flatten import TracingAdapter

        return TracingAdapter
    except ImportError:
        pass
    import os

    import detectron2

    if _EXPORT_ALIAS not in sys.modules:
        package = types.ModuleType(_EXPORT_ALIAS)
        package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
        sys.modules[_EXPORT_ALIAS] = package
    return importlib.import_module(f"{_EXPORT_ALIAS}.flatten").TracingAdapter


def create_local_process_group(num_per_machine: int) -> None:
    """Give detectron2 its per-machine process group (``comm.get_local_rank/get_local_size``).

    Call in every process once the global group is up (``new_group`` is collective); ranks
    ``m * num_per_machine ... (m + 1) * num_per_machine - 1`` are machine ``m``, as detectron2's
    launcher lays them out.

    Args:
        num_per_machine: processes on each machine.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):  # detectron2 after v0.6
        comm.create_local_process_group(num_per_machine)
        return
    machine_rank = dist.get_rank() // num_per_machine
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: tuple = (),
    cuda: Optional[bool] = None,
) -> None:
    """detectron2's ``launch``, which also runs without CUDA.

    With CUDA this is ``detectron2.engine.launch`` (NCCL, one GPU per process). Without it, or
    when the models run on the CPU (``cuda`` False), ``num_gpus_per_machine`` CPU processes are
    started per machine and joined over gloo, with the same rank layout and local process group
    as the GPU launcher (one process per machine is the calling one).

    Args:
        main_func: called in every process with ``*args``.
        num_gpus_per_machine: processes per machine.
        num_machines: machines taking part.
        machine_rank: this machine's rank.
        dist_url: ``tcp://host:port`` of machine 0, or "auto" for a free local port.
        args: arguments for ``main_func``.
        cuda: whether the processes run their models on GPUs (default: whether CUDA is there).
    """
    import torch
    from detectron2.engine import launch as d2_launch

    if torch.cuda.is_available() if cuda is None else cuda:
        d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    import torch.multiprocessing as mp
    from detectron2.engine.launch import _find_free_port

    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url=auto is not supported in multi-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_gpus_per_machine == 1:  # one process per machine: this one, no child to start
        _cpu_worker(0, main_func, world_size, 1, machine_rank, dist_url, args)
        return
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
) -> None:
    import torch.distributed as dist
    from detectron2.utils import comm

    install_import_hook()
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(
            "gloo", init_method=dist_url, world_size=world_size, rank=global_rank
        )
    except Exception as e:
        raise RuntimeError(
            f"rank {global_rank} of {world_size} cannot join the process group at {dist_url}: {e}"
        ) from e
    create_local_process_group(num_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
