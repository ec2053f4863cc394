"""The bundle folder: the only thing that crosses from export to runtime (CONTRACT.md).

Torch-free on purpose: `edgeenc info` and the runtime read and verify bundles with the
standard library alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
PARITY = "parity.json"
LABELS = "labels.json"
MANIFEST_FORMAT = 1


class BundleError(ValueError):
    """A bundle that is missing, incomplete or changed since export."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: object) -> None:
    from edgeenc.runtime.writers import atomic_text

    with atomic_text(path) as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
        fh.write("\n")


def bundle_files(bundle: Path) -> list[str]:
    """Every file of the bundle except the manifest itself, as sorted relative paths."""
    bundle = Path(bundle)
    return sorted(
        str(p.relative_to(bundle))
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def hash_files(bundle: Path) -> dict[str, dict]:
    return {
        name: {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
        for name in bundle_files(bundle)
    }


def write_manifest(bundle: Path, manifest: dict) -> dict:
    """Add the hash of every file in the folder and write manifest.json atomically."""
    bundle = Path(bundle)
    manifest = {**manifest, "format": MANIFEST_FORMAT, "files": hash_files(bundle)}
    write_json_atomic(bundle / MANIFEST, manifest)
    return manifest


def read_manifest(bundle: Path) -> dict:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder; pass the folder that `edgeenc export` wrote")
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; is this a bundle written by `edgeenc export`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc


def verify_bundle(bundle: Path, manifest: dict | None = None) -> list[str]:
    """Problems found (changed, missing or unlisted files), empty when the bundle is intact."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    listed = manifest.get("files", {})
    problems = []
    for name, entry in sorted(listed.items()):
        path = bundle / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: changed since export (sha256 differs from the manifest)")
    for name in bundle_files(bundle):
        if name not in listed and not name.startswith("engines/"):
            problems.append(f"{name}: not listed in the manifest")
    return problems


def add_files_to_manifest(bundle: Path, names: list[str], **fields) -> dict:
    """Hash files added after export (engines, optimised variants) into the manifest."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for name in names:
        manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    manifest.update(fields)
    write_json_atomic(bundle / MANIFEST, manifest)
    return manifest
