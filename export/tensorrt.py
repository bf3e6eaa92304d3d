"""TensorRT plans from an engine dir's ONNX files (TensorRT 10.x and 11.x Python API).

python -m export.tensorrt --run runs/<name> [--students cnn vit] [--variants fp32 fp16 int8.qdq]

Precision comes from the ONNX graph (TensorRT 11 removed the FP16/INT8 builder flags): the network
is strongly typed on 10.x (flag STRONGLY_TYPED) and always on 11.x (flags 0). One optimization
profile spans the manifest's min/opt/max shapes; a timing cache file beside the engine dirs is
reused between builds. A plan is rebuilt when its ONNX, the TensorRT version or the GPU changed.
Without the `tensorrt` module, `trtexec` on PATH builds the same plan. Each new plan is run
natively (serve.tensorrt) and must agree with its ONNX source on the export's example images, else it
is deleted. Where it cannot be run (no `tensorrt` module or pycuda beside trtexec, a GPU out of memory),
it is kept and marked unchecked, and the next run on a host that can run it checks it; `--no-check`
skips the check. No plan is deleted except one that was run and disagreed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from export.card import write_cards
from serve.backends import runtime_problem
from serve.images import read_image
from serve.manifest import EngineEntry, Manifest, read_manifest, sha256, write_manifest
from serve.runtime import Engine, OnnxRuntimeEngine
from serve.segmenter import Segmenter, resize
from serve.tensorrt import cuda_errors

log = logging.getLogger(__name__)

PLAN_VARIANTS = ("fp32", "fp16", "int8.qdq")  # int8.cpu's asymmetric u8 Q/DQ is not TensorRT's
WORKSPACE_BYTES = 4 << 30
INSTALL_HINT = (
    "TensorRT is not installed. On a machine with an NVIDIA GPU: "
    "pip install -e '.[trt]' --extra-index-url https://pypi.nvidia.com "
    "(or put TensorRT's trtexec on PATH); the ONNX engines are ready meanwhile."
)


class TensorRTUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """What a plan is bound to: it runs only on this TensorRT version and GPU architecture."""

    version: str
    gpu: str
    compute_capability: str


Shape = tuple[int, ...]


def network_flags(trt, major: int) -> int:
    """0 on TensorRT 11 (always strongly typed); STRONGLY_TYPED on 10 so the ONNX types are obeyed."""
    if major >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def plan_file(onnx_file: str) -> str:
    return onnx_file.removesuffix(".onnx") + ".plan"


def cache_file(root: Path, target: Target) -> Path:
    """Timing caches are specific to TensorRT version and device: one file per pair."""
    gpu = "".join(c if c.isalnum() else "-" for c in target.gpu).strip("-").lower()
    return root / f"timing-cache.trt{target.version}.{gpu}.sm{target.compute_capability.replace('.', '')}.bin"


def uses_tf32(variant: str) -> bool:
    """TF32 (on by default) computes fp32 GEMMs and convolutions with a 10-bit mantissa: an fp32 plan
    is built without it so that it computes what its name and its fp32 parity gate say."""
    return variant != "fp32"


def rebuild_reason(plan: EngineEntry | None, onnx_entry: EngineEntry, onnx_sha: str, target: Target, dir_: Path):
    """Why a plan must be (re)built, or None when the existing one is valid here."""
    if plan is None or not (dir_ / plan.file).is_file():
        return "no plan yet"
    built = plan.tensorrt or {}
    for key, want in (
        ("version", target.version),
        ("gpu", target.gpu),
        ("compute_capability", target.compute_capability),
    ):
        if built.get(key) != want:
            return f"built for {key} {built.get(key)!r}, this machine has {want!r}"
    if built.get("tf32") != (tf32 := uses_tf32(onnx_entry.variant)):
        return f"built with tf32={built.get('tf32')}, the {onnx_entry.variant} variant needs {tf32}"
    if built.get("onnx_sha256") != onnx_sha:
        return f"{onnx_entry.file} changed since the plan was built"
    return None


def visible_gpu() -> str:
    """The GPU a build and a check run on, as nvidia-smi names it: the first of CUDA_VISIBLE_DEVICES (an
    index or a UUID) where it is set, since CUDA's device 0 is that one and nvidia-smi ignores the variable."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def detect_target(trt_version: str) -> Target:
    """GPU name and compute capability from nvidia-smi (no CUDA binding needed to ask)."""
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", f"--id={visible_gpu()}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise TensorRTUnavailable(f"no NVIDIA GPU found (nvidia-smi: {e})") from None
    name, cc = (part.strip() for part in line.split(",", 1))
    return Target(trt_version, name, cc)


def tensorrt_here() -> Target | None:
    """This host's TensorRT release and GPU (None where either is missing)."""
    try:
        try:
            import tensorrt as trt

            version = release(trt.__version__)
        except ImportError:
            if shutil.which("trtexec") is None:
                return None
            version = _trtexec_version()
        return detect_target(version)
    except (TensorRTUnavailable, OSError, subprocess.SubprocessError):
        return None


def build_with_api(
    onnx_path: Path, plan_path: Path, shapes: tuple[Shape, Shape, Shape], cache: Path, tf32: bool
) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, int(trt.__version__.split(".")[0])))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    resize = getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None:  # TensorRT >= 10.10: a context's memory can be sized for the shape it runs
        config.set_preview_feature(resize, True)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    timing_cache = config.create_timing_cache(cache.read_bytes() if cache.is_file() else b"")
    config.set_timing_cache(timing_cache, False)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, *shapes)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the log above)")
    plan_path.write_bytes(bytes(plan))
    cache.write_bytes(bytes(timing_cache.serialize()))


def trtexec_command(
    onnx_path: Path, plan_path: Path, shapes: tuple[Shape, Shape, Shape], cache: Path, name: str, tf32: bool
) -> list[str]:
    def fmt(shape: Shape) -> str:
        return f"{name}:{'x'.join(map(str, shape))}"

    return [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={fmt(shapes[0])}",
        f"--optShapes={fmt(shapes[1])}",
        f"--maxShapes={fmt(shapes[2])}",
        f"--memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M",
        f"--timingCacheFile={cache}",
        "--stronglyTyped",  # honoured on 10.x, a no-op on 11.x
        "--skipInference",
        *([] if tf32 else ["--noTF32"]),
    ]


def build_engine_dir(engine_dir: Path, variants: list[str], cache_root: Path, check: bool = True) -> Manifest:
    """Build (or keep) one plan per ONNX engine of the given variants; the manifest lists them.
    `check`: each new plan must agree with its ONNX source (see `plan_agreement`) or is deleted."""
    try:
        import tensorrt as trt

        version, use_api = release(trt.__version__), True
    except ImportError:
        if shutil.which("trtexec") is None:
            raise TensorRTUnavailable(INSTALL_HINT) from None
        version, use_api = _trtexec_version(), False
    target = detect_target(version)
    manifest = read_manifest(engine_dir)
    plans = {e.file: e for e in manifest.engines if e.format == "plan"}
    failed = []
    for entry in [e for e in manifest.engines if e.runtime == "onnxruntime" and e.variant in variants]:
        name = plan_file(entry.file)
        onnx_sha = sha256(engine_dir / entry.file)
        reason = rebuild_reason(plans.get(name), entry, onnx_sha, target, engine_dir)
        if reason is None and check and not (plans[name].parity or {}).get("checked", True):
            _check_later(engine_dir, manifest, entry, plans[name], cache_root, failed)
            continue
        if reason is None:
            log.info("%s/%s is up to date", engine_dir.name, name)
            continue
        log.info("building %s/%s (%s)", engine_dir.name, name, reason)
        try:  # each plan on its own: one that fails leaves the others (and the other student) to build
            plan = _build_plan(engine_dir, manifest, entry, onnx_sha, Builder(target, use_api, cache_root, check))
        except (RuntimeError, OSError, subprocess.CalledProcessError, *cuda_errors()) as e:
            log.error("%s/%s not built: %s", engine_dir.name, name, e)
            failed.append(f"{engine_dir.name}/{name}: {e}")
            plan = None
            (engine_dir / name).unlink(missing_ok=True)  # a stale plan is no fallback
        manifest.engines = [e for e in manifest.engines if e.file != name] + ([plan] if plan else [])
        write_manifest(manifest, engine_dir)
    if failed:
        raise PlanBuildError("; ".join(failed))
    return manifest


@dataclass(frozen=True)
class Builder:
    """How plans are built on this host: for which TensorRT and GPU, with the Python API or trtexec, with the
    timing caches (and example images) under `root`, checked against their ONNX source or not."""

    target: Target
    use_api: bool
    root: Path
    check: bool


def _build_plan(engine_dir: Path, manifest: Manifest, entry: EngineEntry, onnx_sha: str, b: Builder) -> EngineEntry:
    name, target = plan_file(entry.file), b.target
    shapes = manifest.profile(entry.io, entry.profile)
    cache = cache_file(b.root, target)
    tmp = engine_dir / f".{name}.tmp"
    tf32 = uses_tf32(entry.variant)
    started = time.perf_counter()
    try:
        if b.use_api:
            build_with_api(engine_dir / entry.file, tmp, shapes, cache, tf32)
        else:
            command = trtexec_command(engine_dir / entry.file, tmp, shapes, cache, "image", tf32)
            subprocess.run(command, check=True)
        plan = EngineEntry(
            file=name,
            format="plan",
            io=entry.io,
            variant=entry.variant,
            precision=entry.precision,
            runtime="tensorrt",
            device="cuda",
            size_bytes=tmp.stat().st_size,
            build_s=round(time.perf_counter() - started, 2),
            profile=entry.profile,
            tensorrt={
                "version": target.version,
                "gpu": target.gpu,
                "compute_capability": target.compute_capability,
                "onnx_sha256": onnx_sha,
                "builder": "python-api" if b.use_api else "trtexec",
                "tf32": tf32,
                "profile": {"min": shapes[0], "opt": shapes[1], "max": shapes[2]},
            },
        )
        if b.check:
            plan.parity = _check_plan(engine_dir, manifest, entry, tmp, plan, b.root / "examples")
        tmp.replace(engine_dir / name)
        return plan
    finally:
        tmp.unlink(missing_ok=True)


def plan_agreement(reference: Engine, candidate: Engine, images: list[np.ndarray]) -> dict[str, float]:
    """Share of pixels on which `candidate`'s class maps equal `reference`'s, image by image (`batch1`)
    and in batches up to the profile's maximum (`batched`), each on its own: TensorRT has returned wrong
    SegFormer results at batch > 1 while reporting success, and a pooled ratio would halve that signal."""
    ref, cand = Segmenter("reference", [reference]), Segmenter("candidate", [candidate])
    if cand.narrowed:  # a plan of an engine the gate passed at the serving size only: checked at that size
        size = tuple(cand.narrowed[0]["opt"][1:])
        images = [resize(im, size, Image.BILINEAR) for im in images]
    pairs = {
        "batch1": [(ref.predict(im), cand.predict(im)) for im in images],
        "batched": list(zip(ref.predict_batch(images), cand.predict_batch(images), strict=True)),
    }
    return {
        mode: sum(int((a.labels == b.labels).sum()) for a, b in p) / max(sum(a.labels.size for a, _ in p), 1)
        for mode, p in pairs.items()
    }


class PlanParityError(RuntimeError):
    """A plan was run and disagreed with its ONNX source: the one case in which a plan is deleted."""


def _check_later(engine_dir: Path, manifest: Manifest, entry: EngineEntry, plan: EngineEntry, root: Path, failed: list):
    """Check a plan kept unchecked by an earlier build, now that this host may run it."""
    try:
        plan.parity = _check_plan(engine_dir, manifest, entry, engine_dir / plan.file, plan, root / "examples")
    except PlanParityError as e:
        log.error("%s", e)
        failed.append(str(e))
        (engine_dir / plan.file).unlink(missing_ok=True)
        manifest.engines = [e for e in manifest.engines if e.file != plan.file]
    write_manifest(manifest, engine_dir)


class PlanBuildError(RuntimeError):
    """Some plans of an engine dir were not built (each named, with why); the others were."""


def _check_plan(engine_dir, manifest, onnx_entry, plan_path, plan, examples: Path) -> dict:
    """The plan against its ONNX source on ONNX Runtime's CPU (which passed the gate against the
    PyTorch student at export), on the example images the export wrote."""
    from export.parity import threshold_for
    from serve.tensorrt import TensorRTEngine

    images = [read_image(p) for p in sorted(examples.glob("*.png"))]
    try:
        if not images:
            raise RuntimeError(f"no example images in {examples} to check it on (python -m export writes them)")
        if why := runtime_problem("tensorrt"):
            raise RuntimeError(why)
        candidate = TensorRTEngine(plan_path, manifest, plan)
    except RuntimeError as e:  # it could not run: kept, marked unchecked
        how = f"python -m export.tensorrt --run RUN on a host with tensorrt and pycuda checks {plan.file}"
        log.warning("%s/%s: kept unchecked, it cannot run here (%s): %s", engine_dir.name, plan.file, e, how)
        return {"checked": False, "why": str(e), "how": how}
    reference = OnnxRuntimeEngine(engine_dir / onnx_entry.file, "cpu", manifest=manifest, entry=onnx_entry)
    agreement = plan_agreement(reference, candidate, images)
    needed = threshold_for(plan.precision).agreement
    shown = ", ".join(f"{mode} {100 * v:.4f}%" for mode, v in agreement.items())
    log.info("%s/%s: pixels agreeing with %s: %s", engine_dir.name, plan.file, onnx_entry.file, shown)
    if failed := [mode for mode, v in agreement.items() if v < needed]:
        raise PlanParityError(
            f"{engine_dir.name}/{plan.file}: pixels agreeing with {onnx_entry.file}: {shown}; {' and '.join(failed)} "
            f"below the {100 * needed:.1f}% gate (plan deleted)"
        )
    return {
        "checked": True,
        "reference": onnx_entry.file,
        "images": len(images),
        "agreement": min(agreement.values()),
        "agreement_by_batch": agreement,
        "threshold": needed,
    }


def release(version: str) -> str:
    """`major.minor.patch` of a TensorRT version as the module states it (`10.16.0.72`) or trtexec's
    banner (`[TensorRT v101600]`: major*10000 + minor*100 + patch since 10.0, `v8601` before).
    Plans and timing caches are bound to the release, so both build paths must name it alike."""
    banner = re.search(r"\[TensorRT v([\d.]+)\]", version)
    token = banner.group(1) if banner else version.strip()
    if re.fullmatch(r"\d+", token):
        n = int(token)
        major, minor = (n // 10000, n // 100 % 100) if n >= 10000 else (n // 1000, n // 100 % 10)
        return f"{major}.{minor}.{n % 100}"
    if match := re.match(r"(\d+)\.(\d+)\.(\d+)", token):
        return ".".join(str(int(g)) for g in match.groups())
    raise TensorRTUnavailable(f"cannot read a TensorRT version from {version[:200]!r}")


def _trtexec_version() -> str:
    """From the banner trtexec prints first (`&&&& RUNNING TensorRT.trtexec [TensorRT v101600] [b72] # ...`)."""
    done = subprocess.run(["trtexec", "--help"], capture_output=True, text=True, timeout=60)
    return release(done.stdout + done.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.tensorrt", description=__doc__)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="engine dirs root (default: RUN/export)")
    parser.add_argument("--students", nargs="+", default=["cnn", "vit"])
    parser.add_argument("--variants", nargs="+", default=list(PLAN_VARIANTS), choices=PLAN_VARIANTS)
    parser.add_argument("--no-check", action="store_true", help="keep plans without running them (no pycuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = args.out or args.run / "export"
    status = 0
    for student in args.students:
        try:
            build_engine_dir(root / student, args.variants, root, check=not args.no_check)
        except TensorRTUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        except PlanBuildError as e:  # the other plans were built and recorded
            print(f"error: {e}", file=sys.stderr)
            status = 1
        except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    write_cards(root)  # the cards list the plans too
    return status


if __name__ == "__main__":
    sys.exit(main())
