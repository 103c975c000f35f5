"""The working directory: the on-disk contract that every subcommand shares.

Layout::

    WORKDIR/
      manifest.json   format version, base model, append-only list of steps (the commit point)
      model/          current weights: save_pretrained safetensors shards + config + tokenizer
      calib/          calibration token windows (safetensors)
      .lock           held by the process that writes the workdir

A step never edits files in place. It writes everything it produces, the new manifest included, into
``.staging/``; renaming ``.staging`` to ``.commit`` is the atomic commit point; the files are then moved into
place. A process that dies before the rename leaves the previous state (the staging area is discarded on the
next open); one that dies after it leaves a committed transaction that the next open finishes (roll forward).
Either way the workdir is always the state before or after a whole step, never in between.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from llmprune.errors import IntegrityError, UserError, WorkdirBusy
from llmprune.fsio import atomic_write_text, dumps, fsync_dir, hash_tree, sha256_file
from llmprune.manifest import FORMAT_VERSION, Step, check_files, checked_name, now_iso, read_manifest
from llmprune.paths import printable, refuse_links, refuse_links_under

SNAPSHOTS = ".recipe"  # hard-linked states between the steps of a recipe (see Workdir.snapshot)
MANIFEST = "manifest.json"
STAGING = ".staging"
COMMIT = ".commit"
TRASH = ".trash"
LOCK = ".lock"
SWEEP = "sweep"  # llmprune sweep's results and runs (llmprune/sweep.py)
REMOVE = ".remove"
RESUME = ".resume"  # the training steps' resume checkpoints (llmprune/resume.py)
SCAFFOLDING = (LOCK, STAGING, TRASH)  # what a step that died before its commit may leave in a new folder
# What a workdir holds besides the folders its manifest records: the only other names `calibrate --force` removes.
OWN = {MANIFEST, LOCK, STAGING, COMMIT, TRASH, SNAPSHOTS, SWEEP, RESUME}
_HELD: set[str] = set()  # workdirs whose lock `Workdir.hold` keeps for this process across steps (real paths)


class Transaction:
    """The files a step writes, gathered in ``.staging/`` until ``Workdir.step`` commits them."""

    def __init__(self, workdir: "Workdir", step: Step, root: Path | None = None):
        self.workdir = workdir
        self.step = step
        self.root = root or workdir.path / STAGING
        self.replaced: set[str] = set()
        self.manifest: dict[str, Any] = {}  # the manifest being written; a step may add header fields
        self.known: dict[str, str] = {}  # staged files hard-linked from recorded ones: their digest, not re-hashed

    def stage(self, name: str) -> Path:
        """A fresh path inside the staging area that will replace ``WORKDIR/name`` on commit."""
        self.replaced.add(name)
        target = self.root / name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


class Workdir:
    """One working directory. ``verify=False`` (``llmprune --no-verify``) skips hashing the files a step reads (huge
    models), and every step so run records it; ``recipe`` is the recipe entry a step runs for (``llmprune run``)."""

    def __init__(self, path: str | Path, *, verify: bool = True, recipe: dict[str, Any] | None = None):
        self.path = Path(path)
        self.verify_inputs = verify
        self.recipe = recipe
        # (file, SHA-256) pairs this object has already hashed: a command that checks a part twice (export of an
        # unmerged adapter checks model/, then loads the current model) reads a multi-GB shard once.
        self._verified: set[tuple[str, str]] = set()
        self._links_checked = False

    # --- layout -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def calib_dir(self) -> Path:
        return self.path / "calib"

    def exists(self) -> bool:
        """A manifest, or a committed one whose move into place a killed step did not finish."""
        return self.manifest_path.is_file() or self._pending_is_ours()

    @property
    def shard_size(self) -> str:
        """The ``--max-shard-size`` the workdir was calibrated with: every step writes its shards that way."""
        return self.steps("calibrate")[0]["params"].get("max_shard_size", "2GB")

    def require_calibration(self) -> "Workdir":
        """This workdir, if it has a model and calibration windows (what every step after calibrate needs)."""
        if not self.steps("calibrate"):
            raise UserError(f"{self.path} has no calibration; run `llmprune calibrate` first")
        return self

    def windows(self):
        """The calibration token windows ``[samples, seqlen]``, checked against their hash."""
        from safetensors.torch import load_file

        self.verify("calib")
        return load_file(self.calib_dir / "windows.safetensors")["input_ids"]

    # --- reading ------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.path.exists():
            raise UserError(f"workdir {self.path} does not exist; create it with `llmprune calibrate {self.path} ...`")
        if not self.path.is_dir():
            raise UserError(f"{self.path} is a file, not a workdir")
        if not self._links_checked:  # once per command: links come from outside, never from a step of ours
            self.check_links()
            self._links_checked = True
        if (self.path / COMMIT).exists() and self._pending_is_ours():
            self._settle()
        if not self.manifest_path.is_file():
            raise UserError(f"{self.path} is not an llmprune workdir (no {MANIFEST})")
        data = read_manifest(self.manifest_path)
        if (self.path / COMMIT).exists() and not self._pending_is_ours():
            raise IntegrityError(f"{self.path / COMMIT} is not a commit llmprune made (no valid manifest in it); "
                                 "the workdir is refused: move it away")
        return data

    def check_links(self) -> None:
        """Refuse (exit 4) a workdir holding a symbolic link among its own entries: a step would write, delete or
        ship through it, outside the workdir."""
        parts = ("model", "calib", "teacher", "adapter", "dress")  # what steps record (see Transaction.stage)
        refuse_links(self.path, *sorted(OWN | set(parts)))
        for name in (COMMIT, STAGING, TRASH, SNAPSHOTS, RESUME, SWEEP, *parts):
            if (self.path / name).is_dir():
                refuse_links_under(self.path / name)

    def _pending_is_ours(self) -> bool:
        """Whether ``.commit`` is one a step of ours made: it always holds a manifest with a format version (a
        foreign folder's ``.commit`` is the user's, and must never be moved into place). One whose manifest is
        damaged is still ours: ``_apply`` refuses it whole."""
        try:
            data = json.loads((self.path / COMMIT / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and bool({"format_version", "files", "steps"} & set(data))

    def steps(self, command: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self.manifest()["steps"] if command is None or s["command"] == command]

    def verify(self, prefix: str) -> None:
        """Check every file recorded under ``prefix`` against its SHA-256 in the manifest."""
        files = {k: v for k, v in self.manifest()["files"].items() if k.startswith(prefix + "/")}
        if not files:
            raise UserError(f"{self.path} has no {prefix}/ yet")
        root = self.path.resolve()
        only_recorded(self.path, prefix, files)
        for rel, digest in files.items():
            p = self.path / rel
            if root not in p.resolve().parents:  # a symbolic link out of the workdir
                raise IntegrityError(f"{p} leads outside the workdir; the workdir is refused")
            if not p.is_file():
                raise IntegrityError(f"{p} is missing (recorded in the manifest)")
            if not self.verify_inputs or (rel, digest) in self._verified:
                continue
            if sha256_file(p) != digest:
                raise IntegrityError(f"{p} does not match its SHA-256 in the manifest: the file was changed or truncated")
            self._verified.add((rel, digest))

    # --- locking and recovery -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the workdir's write lock; a second writer gets a clear error naming the holder. Inside ``hold``
        (``run`` holds the lock across all its steps) each step's own ``locked`` is already held."""
        self.path.mkdir(parents=True, exist_ok=True)
        if os.path.realpath(self.path) in _HELD:
            yield
            return
        lock_path = self.path / LOCK
        self.check_links()
        try:  # never through a link: a .lock that points at a user's file would be truncated
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise IntegrityError(f"{lock_path} is a symbolic link; llmprune never follows links inside a workdir: "
                                 "remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 500, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise WorkdirBusy(f"workdir {self.path} is in use by "
                              + (printable(holder) if holder else "another process")) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {platform.node()} since {now_iso()}".encode())
            self._recover()
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """The lock held across several steps of this process (``run``): each step's ``locked`` passes through,
        while any other process -- or a command the user types meanwhile -- gets ``WorkdirBusy``."""
        with self.locked():
            key = os.path.realpath(self.path)
            _HELD.add(key)
            try:
                yield
            finally:
                _HELD.discard(key)

    def _settle(self) -> None:
        """Finish a step that passed its commit point but died before its files were all moved into place.

        Until then the manifest still describes the state before that step while some of its files already hold
        the step's output: a command that read it now (a recipe deciding what is done, ``recover`` keying its
        checkpoint) would act on the old state and then, once its own step's lock finished the move, read the new
        files. Done under the lock; a process holding it is already finishing the move itself."""
        with contextlib.suppress(WorkdirBusy):
            with self.locked():
                pass

    def _recover(self) -> None:
        """Finish a committed transaction, discard an uncommitted one."""
        staging, commit, trash = (self.path / n for n in (STAGING, COMMIT, TRASH))
        if staging.exists():
            shutil.rmtree(staging)
        if commit.exists() and self._pending_is_ours():
            self._apply(commit)
        if trash.exists():
            shutil.rmtree(trash)

    def _apply(self, commit: Path) -> None:
        """Move the committed files into place. Idempotent: safe to re-run after a crash at any point."""
        # Checked whole before anything moves: a pending commit is metadata like the manifest, and one that names a
        # path outside the workdir or holds a damaged manifest is refused, not half applied.
        removals = []
        if (commit / REMOVE).exists():
            removals = [checked_name(n, str(commit / REMOVE), top_level=True)
                        for n in filter(None, (commit / REMOVE).read_text(encoding="utf-8").splitlines())]
        if (commit / MANIFEST).exists():
            try:
                check_files(json.loads((commit / MANIFEST).read_text(encoding="utf-8")), commit / MANIFEST)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise IntegrityError(f"{commit / MANIFEST} is not valid JSON; the pending commit is refused") from None
        trash = self.path / TRASH
        trash.mkdir(exist_ok=True)
        # The manifest moves last: until it does, a reader still sees the old manifest, and ``.commit`` tells
        # the next writer to finish the move.
        names = sorted(p.name for p in commit.iterdir() if p.name not in (MANIFEST, REMOVE))
        for name in removals:  # a restore: names the restored state does not have
            if (self.path / name).exists():
                os.replace(self.path / name, trash / f"{name}.{time.time_ns()}")
        for name in names:
            target = self.path / name
            if target.exists():
                os.replace(target, trash / f"{name}.{time.time_ns()}")
            os.replace(commit / name, target)
        if (commit / MANIFEST).exists():
            os.replace(commit / MANIFEST, self.manifest_path)
        fsync_dir(self.path)
        shutil.rmtree(commit)
        shutil.rmtree(trash, ignore_errors=True)

    # --- writing ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, command: str, params: dict[str, Any], *, create: dict[str, Any] | None = None) -> Iterator[Transaction]:
        """Run one step as a transaction: stage its outputs, then commit them together with its manifest entry.

        ``create`` starts a new workdir with that manifest header (``calibrate``); otherwise the workdir must exist.

        Under ``accelerate launch`` every process runs the step, but only the main one (``RANK`` 0) locks and
        commits; the others stage into a private temporary folder that is thrown away.
        """
        if int(os.environ.get("RANK", "0")) != 0:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="llmprune-rank") as tmp:
                tx = Transaction(self, Step(command, params), Path(tmp))
                tx.manifest = dict(create) if create is not None else self.manifest()
                yield tx
            return
        if create is None:
            self.manifest()  # a missing or foreign folder is refused before the lock would create anything there
        with self.locked():
            manifest = dict(create) if create is not None else self.manifest()
            # the top-level folders of the workdir this step replaces (calibrate --force), before anything moves
            old_tops = ({rel.split("/", 1)[0] for rel in read_manifest(self.manifest_path)["files"]}
                        if create is not None and self.manifest_path.is_file() else set())
            if create is not None:
                manifest.setdefault("format_version", FORMAT_VERSION)
                manifest.setdefault("steps", [])
                manifest.setdefault("files", {})
            step = Step(command, params)
            tx = Transaction(self, step)
            tx.manifest = manifest
            staging = self.path / STAGING
            staging.mkdir()
            try:
                yield tx
                # Record the hashes of what this step replaced; keep the others.
                files = {
                    k: v for k, v in manifest["files"].items() if k.split("/", 1)[0] not in tx.replaced
                }
                for name in sorted(tx.replaced):
                    staged = staging / name
                    if staged.is_dir():
                        new = hash_tree(staged, staging, tx.known)
                    elif staged.is_file():
                        new = {name: sha256_file(staged)}
                    else:
                        new = {}
                    files.update(new)
                    step.outputs.update(new)
                manifest["files"] = dict(sorted(files.items()))
                manifest["steps"] = [*manifest["steps"], step.to_json(verified=self.verify_inputs,
                                                                      recipe=self.recipe)]
                atomic_write_text(staging / MANIFEST, dumps(manifest, indent=2) + "\n")
                fsync_dir(staging)
                os.replace(staging, self.path / COMMIT)  # the commit point
                fsync_dir(self.path)
                self._apply(self.path / COMMIT)
                if create is not None:
                    # A new workdir over an old one (--force): what the old one had beyond this step goes -- only
                    # names a workdir owns (check_fresh refused a folder holding anything else).
                    keep = {MANIFEST, LOCK, *tx.replaced}
                    for child in self.path.iterdir():
                        if child.name not in keep and child.name in OWN | set(old_tops):
                            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    # --- snapshots (recipes) -------------------------------------------------------------------------------
    def snapshot(self, name: str) -> Path:
        """Keep the current state (manifest and every recorded file) under ``.recipe/NAME`` as hard links.

        Free in space: steps never modify a file in place (they write new files and rename them over the old ones),
        so a hard-linked snapshot keeps the old bytes alive and nothing else. Made in a temporary folder and renamed,
        so a snapshot exists whole or not at all.
        """
        final = self.path / SNAPSHOTS / name
        if not final.exists():
            self.link_to(final)
        return final

    def link_to(self, dest: Path) -> None:
        """The current state (manifest and every recorded file) at ``dest``, a new folder, as hard links: a
        workdir of its own (a recipe's snapshot, a sweep's point) at no cost in space, since steps never modify a
        file in place. Made in a temporary sibling and renamed, so it exists whole or not at all."""
        tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        for rel in [*self.manifest()["files"], MANIFEST]:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.path / rel, dst)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    def branch(self, dest: Path) -> None:
        """``llmprune branch``: the current state as a new workdir at ``dest`` (hard links, ``link_to``), taken under
        the lock so no step commits half-way through it. ``dest`` must be new, on the same filesystem."""
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            raise UserError(f"{dest} exists; a branch is a new folder")
        self.manifest()
        with self.locked():
            try:
                self.link_to(dest)
            except OSError as e:
                tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                why = "hard links need the same filesystem" if e.errno == errno.EXDEV else e.strerror
                raise UserError(f"cannot branch {self.path} to {dest}: {why}") from None

    def restore(self, name: str) -> None:
        """Bring back the state of snapshot ``name`` as one transaction (what it lacks is removed)."""
        snap = self.path / SNAPSHOTS / checked_name(name, "a recipe snapshot", top_level=True)
        try:
            manifest = json.loads((snap / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IntegrityError(f"the recipe snapshot {snap} cannot be read ({e}); the workdir is refused") from None
        check_files(manifest, snap / MANIFEST)
        with self.locked():
            staging = self.path / STAGING
            staging.mkdir()
            try:
                for rel in manifest["files"]:
                    dst = staging / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(snap / rel, dst)
                tops = {rel.split("/", 1)[0] for rel in manifest["files"]}
                # only what the current state records goes (WORK/sweep, a user's notes: not the state's to remove)
                gone = sorted({rel.split("/", 1)[0] for rel in self.manifest()["files"]} - tops)
                (staging / REMOVE).write_text("\n".join(gone), encoding="utf-8")
                atomic_write_text(staging / MANIFEST, dumps(manifest, indent=2) + "\n")
                fsync_dir(staging)
                os.replace(staging, self.path / COMMIT)
                fsync_dir(self.path)
                self._apply(self.path / COMMIT)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def drop_snapshots(self, keep: set[str]) -> None:
        root = self.path / SNAPSHOTS
        if root.exists():
            for p in root.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)

    def record_inputs(self, tx: Transaction, prefix: str) -> None:
        """Record in the step the hashes of the workdir files under ``prefix`` that the step reads."""
        tx.step.inputs.update(
            {k: v for k, v in self.manifest()["files"].items() if k.startswith(prefix + "/")}
        )


def remove_scaffolding(path: Path) -> None:
    """Remove a folder that holds nothing but a workdir's scaffolding (lock, staging), as a failed first step leaves."""
    if path.is_dir() and not path.is_symlink() and all(p.name in SCAFFOLDING for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def check_fresh(path: Path, force: bool, params: dict[str, Any] | None = None) -> None:
    """Refuse to start a workdir over an existing folder unless ``force``, and even then only over a workdir: a
    folder whose manifest is an llmprune manifest and which holds nothing but what llmprune writes there. A folder
    with a ``manifest.json`` of another program, or with the user's files beside a workdir, is never replaced."""
    # A first step killed before its commit leaves only our own scaffolding (lock, staging): still a fresh folder.
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a link to nothing; choose another path")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; a workdir is a folder: choose another path")
    if not path.exists() or all(p.name in SCAFFOLDING and not p.is_symlink() for p in path.iterdir()):
        return
    ws = Workdir(path)
    if not (path / MANIFEST).is_file() and not ((path / COMMIT).is_dir() and ws._pending_is_ours()):
        raise UserError(f"{path} exists and is not an llmprune workdir; choose another path")
    manifest = ws.manifest()  # a workdir that does not match its own records is refused (exit 4)
    files = manifest["files"]
    if not force:
        steps = manifest["steps"]
        given = json.loads(dumps(params)) if params is not None else None
        # (a key left out of ``params`` -- a default the step resolves, as calibrate's window length -- matches any)
        if given is not None and len(steps) == 1 and all(steps[0]["params"].get(k, given) == v
                                                          for k, v in given.items()):
            # a calibrate stopped after its commit point (killed while exiting, say) did finish: say so
            raise UserError(f"{path} is already calibrated with these options (that run finished before it was "
                            f"stopped; `llmprune status {path}` shows it); pass --force to calibrate it again")
        raise UserError(f"{path} is already a workdir; pass --force to overwrite it")
    recorded = {rel.split("/", 1)[0] for rel in files}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN | recorded)
    if foreign:
        raise UserError(f"{path} holds {', '.join(map(printable, foreign[:3]))}"
                        + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                        + ", which llmprune did not write; --force replaces only a workdir's own files: move them "
                        "away or choose another path")
    for top in sorted(recorded):  # inside a recorded folder, too: only what the manifest lists
        try:
            only_recorded(path, top, files)
        except IntegrityError as e:  # the user's file in the workdir: not ours to delete, theirs to move
            raise UserError(f"--force replaces only a workdir's own files: {e}") from None


def only_recorded(root: Path, prefix: str, files: dict[str, str]) -> None:
    """Refuse (exit 4) a link, or a file the manifest does not record, under ``root/prefix``: a step would adopt it
    into its output, and ``export`` would ship it."""
    if not (root / prefix).is_dir():
        return
    refuse_links_under(root / prefix)
    unrecorded = sorted(rel for p in (root / prefix).rglob("*")
                        if not p.is_dir() and (rel := p.relative_to(root).as_posix()) not in files)
    if unrecorded:
        raise IntegrityError(f"{root / unrecorded[0]} is not recorded in the manifest"
                             + (f" (nor {len(unrecorded) - 1} other file(s))" if len(unrecorded) > 1 else "")
                             + f"; a workdir's {prefix}/ holds only what llmprune wrote: move it away")
