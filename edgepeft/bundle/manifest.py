"""A deployable bundle: a folder an app team can ship, described by its ``manifest.json``.

The manifest lists every other file of the bundle with its size and sha256, and says how it was made
(edgepeft version, base model and adapter hashes, recipe, target, measured figures). It hashes itself too:
``manifest_sha256`` covers its own canonical JSON without that key, and the file must be exactly that
canonical JSON, so a changed byte anywhere in the bundle, manifest included, fails ``verify``.

Reading a bundle never leaves it: manifest paths must be plain relative paths inside the folder, and
symbolic links are refused.

A finished bundle gains sections later (``profile/`` from ``edgepeft profile``, ``quality/`` from the quality
gate) through ``add_section`` alone: the bundle is checked against its manifest first, then a new bundle
folder (hard links, the section, the re-sealed manifest) replaces it in one swap: all or nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import file_table, folder_lock, link_tree, replace_dir, table_problems, write_atomic

MANIFEST = "manifest.json"
FORMAT = "edgepeft-bundle/1"


def canonical(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def seal(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return canonical({**body, "manifest_sha256": hashlib.sha256(canonical(body)).hexdigest()})


def write_manifest(folder: Path, manifest: dict) -> None:
    """Seal ``manifest`` with the table of every other file in ``folder`` and write it."""
    files = {k: v for k, v in file_table(folder).items() if k != MANIFEST}
    write_atomic(folder / MANIFEST, seal({**manifest, "format": FORMAT, "files": files}))


def adapter_sha256(adapter_dir: Path) -> str:
    """The adapter's hash a manifest records: over its files' names and sha256s, so the run folder a bundle
    was made in can be matched to it."""
    h = hashlib.sha256()
    for rel, entry in sorted(file_table(adapter_dir).items()):
        h.update(f"adapter/{rel}\0{entry['sha256']}\n".encode())
    return h.hexdigest()


def open_for_update(folder: Path) -> dict:
    """The manifest of a bundle about to gain files; refuses a bundle that does not match its manifest, since
    re-sealing it would bless whatever changed."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    if problems:
        raise EdgepeftError(f"{folder}: does not match its manifest ({problems[0]}); run `edgepeft verify {folder}`")
    return manifest


def reseal(folder: Path, manifest: dict, **entries) -> None:
    """Re-hash the bundle's files and seal ``manifest`` with ``entries`` set (after files were added)."""
    body = {k: v for k, v in manifest.items() if k not in ("files", "format", "manifest_sha256")}
    write_manifest(folder, {**body, **entries})


def add_section(folder: Path, manifest: dict, name: str, fill: Callable[[Path], None], **entries) -> Path:
    """Put the folder ``name`` into a sealed bundle whose ``manifest`` came from ``open_for_update``, all or
    nothing: a new bundle folder is built beside it (hard links to the unchanged files), ``fill`` writes the
    section there, the manifest is re-sealed there with ``entries`` set, and the new folder then replaces the
    bundle in one swap. Killed or out of disk at any point, the bundle is the old one or the new one, whole.
    Returns the section's folder."""
    folder = Path(folder)
    new = folder.with_name(f".{folder.name}.new")
    with folder_lock(folder.parent, "another edgepeft command is adding a section to this bundle; wait for it"):
        if read_manifest(folder) != manifest:
            raise EdgepeftError(f"{folder}: the bundle changed since its manifest was read (another command added "
                                "a section); run this again")
        _swap_in_section(folder, new, manifest, name, fill, entries)
    return folder / name


def _swap_in_section(folder: Path, new: Path, manifest: dict, name: str, fill, entries: dict) -> None:
    shutil.rmtree(new, ignore_errors=True)
    try:
        link_tree(folder, new)
        section = new / name
        if section.exists():
            shutil.rmtree(section)  # only unlinks: the bundle's own files stay as they are
        section.mkdir()
        fill(section)
        reseal(new, manifest, **entries)  # the manifest is written anew (a rename), never through its link
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    replace_dir(new, folder)


def intact_bundle(folder: Path) -> list[str]:
    """``check_files``, with an unreadable manifest reported as a problem rather than raised."""
    try:
        return check_files(folder)
    except EdgepeftError as e:
        return [str(e)]


def inside_path(folder: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise EdgepeftError(f"{folder}: manifest names a path outside the bundle: {rel!r}")
    return folder.joinpath(*p.parts)


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgepeftError(f"{folder}: not a bundle folder")
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise EdgepeftError(f"{folder}: no {MANIFEST} (not an edgepeft bundle)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepeftError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise EdgepeftError(f"{path}: not an {FORMAT} manifest")
    for rel in manifest["files"]:
        inside_path(folder, rel)
    model_file, target = manifest.get("model_file"), manifest.get("target")
    if not isinstance(model_file, str) or not isinstance(target, dict):
        raise EdgepeftError(f"{path}: incomplete manifest (model_file and target are required)")
    if model_file not in manifest["files"]:
        inside_path(folder, model_file)
        raise EdgepeftError(f"{path}: model_file {model_file!r} is not one of the bundle's files")
    adapters = manifest.get("adapters", {})
    if not isinstance(adapters, dict) or not all(isinstance(a, dict) and isinstance(a.get("file"), str)
                                                 for a in adapters.values()):
        raise EdgepeftError(f"{path}: adapters must map each name to a table with its file")
    for name, entry in adapters.items():
        inside_path(folder, entry["file"])
        if entry["file"] not in manifest["files"]:
            raise EdgepeftError(f"{path}: adapter {name!r}: {entry['file']!r} is not one of the bundle's files")
    return manifest


def gate_failure(manifest: dict) -> str | None:
    """What the quality gate found wrong with this bundle, when it ran and failed; None otherwise."""
    gates = [(None, manifest.get("quality"))] + [(name, a.get("quality")) for name, a in
                                                 (manifest.get("adapters") or {}).items() if isinstance(a, dict)]
    for adapter, q in gates:
        if not isinstance(q, dict) or q.get("passed") is not False:
            continue
        broken = [r.get("budget", "?") for r in q.get("rows", []) if isinstance(r, dict) and not r.get("passed")]
        report = q.get("report", "quality/report.md")
        which = f"adapter {adapter!r} FAILED" if adapter else "FAILED"
        return (f"this bundle's {which} its quality gate ({', '.join(broken) or 'see below'}; {report}): it does "
                "not reproduce the model that was trained")
    return None


def check_files(folder: Path, manifest: dict | None = None) -> list[str]:
    """Every problem found by re-hashing the bundle against its manifest (empty: intact). The manifest file
    is read again for its self-hash, whatever ``manifest`` (the parsed one, to save a reading) says."""
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    problems = []
    raw = (folder / MANIFEST).read_bytes()
    if raw != seal(json.loads(raw)) or json.loads(raw) != manifest:
        problems.append(f"{MANIFEST}: altered (its content does not match its own manifest_sha256)")
    listed = manifest["files"]
    links = {rel for rel in listed if inside_path(folder, rel).is_symlink()}
    problems += [f"{rel}: is a symbolic link" for rel in sorted(links)]
    problems += table_problems(folder, {k: v for k, v in listed.items() if k not in links}, "the manifest")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems
