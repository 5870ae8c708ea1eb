"""Lightning plumbing shared by every entry point: trainer, logger, timing, versions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock, Timeout
from lightning.fabric.utilities.exceptions import MisconfigurationException

# Lightning announces devices and advertises services at every Trainer; keep runs readable.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# The reference end model sits in eval mode on purpose (and so do front/end with update_bn=false).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Under DDP the engine logs epoch values torchmetrics has already synced across processes
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")

from stitching.errors import StitchingError

_TRAINER_KEYS = {
    "accelerator", "devices", "strategy", "num_nodes", "precision", "max_epochs", "max_steps",
    "log_every_n_steps", "deterministic", "benchmark", "enable_progress_bar", "limit_train_batches",
    "limit_test_batches", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches", "fast_dev_run",
}


#: ``trainer`` settings this package applies itself (not Lightning's)
SPEED_KEYS = ("channels_last", "compile")


def speed_up(network: torch.nn.Module, options: dict, parts=None) -> torch.nn.Module:
    """Apply ``trainer.channels_last`` (conv weights in NHWC memory order: faster convolutions on
    GPUs with tensor cores) and ``trainer.compile`` (``torch.compile`` of ``parts``, by default
    the stitched network's front head and end tail, in place: fused kernels after a one-off
    compile) to ``network``."""
    if options.get("channels_last"):
        if next(network.parameters()).is_cuda:
            network.to(memory_format=torch.channels_last)
        else:  # oneDNN's CPU convolution backward on NHWC maps of few channels is slow or crashes
            print("[trainer] channels_last applies on GPUs only; the CPU run keeps NCHW", file=sys.stderr)
    if options.get("compile"):
        for part in parts if parts is not None else (getattr(network, "front", None), getattr(network, "end", None)):
            if part is not None:
                part.compile()
    return network


def precision_autocast(device_type: str, precision) -> contextlib.AbstractContextManager:
    """``trainer.precision`` as Lightning reads it: ``bf16-mixed``/``16-mixed`` autocast, else none
    (for the loops that run without a Lightning Trainer: fused grids, the bench's plain loop)."""
    precision = str(precision or "32-true")
    if precision.startswith(("bf16", "16")) and "mixed" in precision:
        return torch.autocast(device_type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    return contextlib.nullcontext()


def build_trainer(options: dict, run_dir: Path, logger=False, **overrides) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` config group (``None`` values and the settings of
    :data:`SPEED_KEYS` dropped)."""
    settings = {k: v for k, v in {**options, **overrides}.items() if v is not None and k not in SPEED_KEYS}
    unknown = {k for k in options if options[k] is not None and k not in SPEED_KEYS} - _TRAINER_KEYS
    if unknown:
        raise StitchingError(f"unknown trainer setting(s) {sorted(unknown)}; known: {sorted(_TRAINER_KEYS)}")
    try:
        return L.Trainer(
            default_root_dir=str(run_dir), logger=logger, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0, **settings,
        )
    except (MisconfigurationException, ImportError, ValueError, TypeError, RuntimeError) as err:  # Lightning's checks
        shown = ", ".join(f"trainer.{k}={v}" for k, v in sorted(settings.items()) if k != "enable_progress_bar")
        raise StitchingError(f"Lightning refuses the trainer settings ({shown}): "
                             f"{str(err).strip().splitlines()[0]}") from None


def build_logger(options: dict, run_dir: Path, run_name: str, config: dict | None = None):
    """``csv`` (default), ``wandb`` (offline unless a key is configured) or ``none``."""
    kind = options.get("kind", "csv")
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(
            project=options.get("project", "stitching"), group=options.get("group"), name=run_name,
            save_dir=str(run_dir), offline=wandb_offline(options.get("offline", "auto")),
            tags=list(options.get("tags") or []),
        )
        if config is not None:
            logger.log_hyperparams(config)
        return logger
    raise StitchingError(f"unknown logger kind '{kind}'; use csv, wandb or none")


def wandb_offline(setting="auto") -> bool:
    """``auto``: offline unless a key is configured or ``WANDB_MODE=online``."""
    if setting == "auto":
        return not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"
    return bool(setting)


class Stopwatch:
    """Named wall-clock sections, reported in seconds."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sections: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.sections[name] = round(self.sections.get(name, 0.0) + time.perf_counter() - begin, 3)

    def report(self) -> dict[str, float]:
        return {**self.sections, "total_s": round(time.perf_counter() - self.start, 3)}


def versions() -> dict[str, str]:
    """What the numbers were computed with: the packages, the device, and the torch threads (a
    seed fixes a model only up to the order of its float arithmetic, which the thread count
    changes; epochs of training amplify the last bits into visibly different weights)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("lightning", "hydra-core", "torchvision", "stitching-similarity"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    found["cuda"] = str(torch.version.cuda or "none")
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    found["threads"] = str(torch.get_num_threads())
    return found


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt leaves nothing half-written behind
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def cache_warning(path: Path, err: BaseException) -> None:
    """A cache that cannot be written costs the cache, never the run's results."""
    print(f"[cache] warning: could not write {path} ({type(err).__name__}: {err}); "
          f"the run keeps its results, the cache stays as it was", file=sys.stderr, flush=True)


def tensors_digest(named) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and values, in the order given): what a
    cache key holds so that a cached result is only reused for exactly the same inputs."""
    digest = hashlib.sha256()
    for name, tensor in named:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextmanager
def cache_lock(path: Path, timeout: float = -1):
    """Hold ``path``'s lock file while a cache is read and filled; where the lock cannot be
    created (a read-only or full folder) go on without it, with a warning."""
    lock = FileLock(str(path) + ".lock", timeout=timeout)
    try:
        lock.acquire()
        held = True
    except (OSError, Timeout) as err:
        cache_warning(Path(str(path) + ".lock"), err)
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()


def write_cache(path: Path, write) -> bool:
    """``write(path)`` via a temporary file and a rename; ``False`` (and a warning) when the
    folder cannot take it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
        return True
    except OSError as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        cache_warning(path, err)
        return False


def release_memory() -> None:
    """Return what a finished run held: collect reference cycles, empty the CUDA cache and
    hand freed heap pages back to the system (glibc). Between the runs of an in-process
    sweep this keeps the resident size flat instead of growing a few MiB per run."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
