"""What the GPU check needs that a lent GPU machine lacks, carried there in parts of at most 60 MiB.

The lent machine (Python 3.12, its own torch for CUDA 13, timm, numpy, Pillow...) can download
nothing, and each call to it carries at most 64 MiB, working tree included. DALI for CUDA 13 alone is
a 199 MB wheel. So, here (with a package registry)::

    python -m benchmarks.gpu_bundle pack          # make gpu-bundle: wheels + source photos -> parts

downloads the pinned wheels (``WHEELS``: DALI, its dependencies the machine does not have, and what
the sharder and loaders need: webdataset, lmdb), adds the benchmark's source photographs (the
opencv-doc photos, 19 MB), packs them into one tar and cuts it into ``.gpu-bundle/part-NN/`` folders
of at most 60 MiB, with ``.gpu-bundle/manifest.json`` (sha256 of every part and of the whole). Then
one call per part, each carrying ``.gpu-bundle/manifest.json`` and its ``part-NN``::

    python3 -m benchmarks.gpu_bundle receive      # there: keeps the part under /tmp/flora-gpu

The machine stays warm ~30 s between calls, so the parts accumulate in ``/tmp/flora-gpu/parts``;
once all are there (each checked against the manifest), ``receive`` joins them, checks the whole,
unpacks the photos and installs the wheels with pip into ``/tmp/flora-gpu/site`` (no index, no
downloads), which ``make gpu-check`` puts on ``PYTHONPATH`` beside the machine's own torch.

Leaves out: the measuring (gpu.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from flora.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu-bundle"  # git-ignored; each call carries the manifest and one part
STAGE = Path("/tmp/flora-gpu")  # on the GPU machine: survives between calls while the machine is warm
MIB = 1024 * 1024
#: The device tool carries at most 64 MiB per call, working tree included (about 2 MB here).
PART_BYTES = 60 * MIB
#: For the lent machine: CPython 3.12 on x86-64, CUDA 13 (torch 2.11+cu130). DALI 2.4's own
#: requirements, less what that machine has (numpy, six, packaging, pyyaml, typing-extensions);
#: nvjpeg at the CUDA 13.0 line of the machine's runtime; the loaders' and the sharder's extras.
WHEELS = [
    "nvidia-dali-cuda130==2.4.0",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-libnvcomp-cu13==5.3.0.16",
    "nvidia-nvjpeg==13.0.3.75",
    "nvidia-nvjpeg2k-cu13==0.11.0.51",
    "nvidia-nvtiff-cu13==0.8.0.82",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "optree==0.20.0",
    "nvtx==0.2.17",
    "makefun==1.16.0",
    "libcst==1.9.0",
    "webdataset==1.0.2",
    "braceexpand==0.1.7",
    "lmdb==3.0.0",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]


class BundleError(RuntimeError):
    """The bundle cannot be made or received as asked."""


def download_wheels(dest: Path, wheels: list[str] = WHEELS) -> list[Path]:
    """The pinned wheels for the GPU machine's Python, downloaded here with pip (no dependencies)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    proc = subprocess.run([*cmd, *wheels], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(f"pip download failed: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(dest.glob("*.whl"))


def split(archive: Path, out: Path, part_bytes: int = PART_BYTES) -> dict:
    """Cuts ``archive`` into ``out/part-NN/bundle.part`` files; writes and returns the manifest."""
    if part_bytes < 1:
        raise BundleError(f"part size must be >= 1 byte, got {part_bytes}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    size = archive.stat().st_size
    count = max(1, -(-size // part_bytes))
    parts = []
    with archive.open("rb") as f:
        for n in range(1, count + 1):
            folder = out / f"part-{n:02d}"
            folder.mkdir()
            path = folder / "bundle.part"
            path.write_bytes(f.read(part_bytes))
            parts.append({"name": folder.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = {"archive": archive.name, "bytes": size, "sha256": sha256_file(archive), "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def pack(photos: list[Path], wheels: list[Path], out: Path = BUNDLE, part_bytes: int = PART_BYTES) -> dict:
    """One tar of ``wheels/`` and ``photos/``, cut into parts (see ``split``)."""
    work = out.parent / f"{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    archive = work / "flora-gpu-bundle.tar"
    with tarfile.open(archive, "w") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        for i, photo in enumerate(photos):
            tar.add(photo, arcname=f"photos/{i:04d}{photo.suffix}")
    manifest = split(archive, out, part_bytes)
    shutil.rmtree(work)
    return manifest


def receive(bundle: Path = BUNDLE, stage: Path = STAGE, install: bool = True) -> dict:
    """Keeps the carried parts in ``stage``; with all of them, joins, checks, unpacks and installs.

    Returns ``{"have": [...], "missing": [...], "ready": bool, "site": path or None}``.
    """
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"no {manifest_path}: carry .gpu-bundle/manifest.json with each part")
    manifest = json.loads(manifest_path.read_text())
    ready_marker = stage / "ready.json"
    if ready_marker.is_file() and json.loads(ready_marker.read_text()).get("sha256") == manifest["sha256"]:
        return {
            "have": [p["name"] for p in manifest["parts"]],
            "missing": [],
            "ready": True,
            "site": str(stage / "site"),
        }
    parts_dir = stage / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for part in manifest["parts"]:
        carried = bundle / part["name"] / "bundle.part"
        kept = parts_dir / part["name"]
        if carried.is_file() and not kept.is_file():
            if sha256_file(carried) != part["sha256"]:
                raise BundleError(f"{part['name']}: sha256 differs from the manifest (a broken transfer?)")
            shutil.copyfile(carried, kept.with_suffix(".tmp"))
            kept.with_suffix(".tmp").rename(kept)
    have = [p["name"] for p in manifest["parts"] if (parts_dir / p["name"]).is_file()]
    missing = [p["name"] for p in manifest["parts"] if p["name"] not in have]
    if missing:
        return {"have": have, "missing": missing, "ready": False, "site": None}
    archive = stage / manifest["archive"]
    with archive.open("wb") as out:
        for part in manifest["parts"]:
            with (parts_dir / part["name"]).open("rb") as f:
                shutil.copyfileobj(f, out, MIB)
    if sha256_file(archive) != manifest["sha256"]:
        raise BundleError("the joined bundle's sha256 differs from the manifest")
    with tarfile.open(archive) as tar:
        tar.extractall(stage, filter="data")
    archive.unlink()
    shutil.rmtree(parts_dir)
    site = stage / "site"
    if install:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += [
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *map(str, sorted((stage / "wheels").glob("*.whl"))),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BundleError(f"pip install of the carried wheels failed: {proc.stderr.strip()[-500:]}")
        # Some NVIDIA wheels ship nvidia/__init__.py, which would make this folder's ``nvidia`` hide the
        # machine's own nvidia.* packages (cuDNN, NCCL...): keep it a namespace package that merges.
        (site / "nvidia" / "__init__.py").unlink(missing_ok=True)
    ready_marker.write_text(json.dumps({"sha256": manifest["sha256"]}))
    return {"have": have, "missing": [], "ready": True, "site": str(site)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_bundle", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    p_pack = sub.add_parser("pack", help="here: download the wheels, add the photos, cut into parts")
    p_pack.add_argument("--part-mib", type=int, default=PART_BYTES // MIB)
    p_recv = sub.add_parser(
        "receive", help="on the GPU machine: keep this call's part; install when complete"
    )
    p_recv.add_argument("--stage", type=Path, default=STAGE)
    args = parser.parse_args(argv)
    try:
        if args.verb == "pack":
            from benchmarks.photos import fetch_sources

            work = REPO / "benchmarks" / "out" / "gpu"
            photos = fetch_sources(work / "photos_src")
            wheels = download_wheels(work / "wheels")
            manifest = pack(photos, wheels, BUNDLE, args.part_mib * MIB)
            print(
                f"{len(wheels)} wheels + {len(photos)} photos = {manifest['bytes'] / MIB:.1f} MiB in "
                f"{len(manifest['parts'])} parts under {BUNDLE.relative_to(REPO)}/"
            )
            for part in manifest["parts"]:
                print(f"  carry: .gpu-bundle/manifest.json .gpu-bundle/{part['name']}")
            return 0
        state = receive(BUNDLE, args.stage)
    except BundleError as exc:
        print(f"gpu_bundle: error: {exc}", file=sys.stderr)
        return 2
    if not state["ready"]:
        have = ", ".join(state["have"]) or "no parts"
        print(f"gpu_bundle: have {have}; still to carry: {', '.join(state['missing'])}")
        return 3
    print(f"gpu_bundle: ready; PYTHONPATH={state['site']} photos={args.stage / 'photos'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
