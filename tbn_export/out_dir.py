"""What tbn-export may do with its --out (standard library and tbn_runtime only): what an
export folder holds, whether --out is new, up to date, an export to replace or something to
refuse (it replaces only an export it wrote, never a folder holding anything else), installing
a finished export in place of the old one, and stamping the export made or confirmed last (what
tbn-run takes without --model)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import List, Optional, Tuple

from tbn_runtime.errors import TbnError

log = logging.getLogger("tbn_export")


class OutDirError(TbnError, ValueError):
    """An --out that tbn-export must not write into; one line naming it and the fix."""


def check_out_dir(out: str, model_name: str, precision: str, overwrite: bool,
                  same_as: Optional[dict] = None) -> Tuple[str, Optional[str]]:
    """What to do with --out: ("new" | "replace" | "up to date", a note for the user).

    Refused (OutDirError), --overwrite or not: a folder holding anything an export does not
    (not_of_an_export). Refused without --overwrite: an unreadable export, the export of another
    model or another precision. The export of the same model and precision
    from another checkpoint or at another size is replaced (a newer checkpoint of the same run:
    what re-running the default chain tbn-train -> tbn-export does). One whose manifest equals
    `same_as` (checkpoint sha256, size, logits) is up to date and left alone.
    """
    from tbn_runtime.manifest import ManifestError, load_manifest

    if os.path.exists(out) and not os.path.isdir(out):
        raise OutDirError(f"--out {out} exists and is not a directory")
    if not os.path.isdir(out) or not [e for e in os.listdir(out) if not e.startswith(".tbn")]:
        return "new", None  # (only tbn-vit's own hidden files, if any: a lock, a stamp)
    foreign = not_of_an_export(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise OutDirError(f"--out {out} holds files that are not a tbn-vit export ({shown}); "
                          f"tbn-export replaces only an export it wrote: choose another --out "
                          f"(or move those files away)")
    if overwrite:
        return "replace", f"replacing the export in {out} (--overwrite)"
    try:
        old = load_manifest(out)
    except ManifestError:
        raise OutDirError(f"--out {out} holds an unreadable export; pass --overwrite to replace "
                          f"it") from None
    if old.model != model_name or old.precision != precision:
        raise OutDirError(f"--out {out} holds the {old.precision} export of '{old.model}', not a "
                          f"{precision} export of '{model_name}'; pass --overwrite to replace it, "
                          f"or choose another --out (each precision has its own default folder)")
    if same_as is not None and (old.checkpoint or {}).get("sha256") == same_as["sha256"] and \
            [old.height, old.width] == same_as["size"] and \
            bool(old.logits_output) == same_as["logits"]:
        return "up to date", (f"{out} already holds this export ({precision} {model_name} at "
                              f"{old.height}x{old.width} from this checkpoint); nothing to do "
                              f"(--overwrite exports again)")
    return "replace", (f"replacing the {old.precision} export of {old.model} in {out} (from "
                       f"{(old.checkpoint or {}).get('path')})")


def not_of_an_export(out: str) -> List[str]:
    """The entries of `out` that no tbn-export wrote (sorted; [] for an export dir): all of
    them without a tbn-vit manifest, else those the manifest does not list. Hidden tbn-vit
    files (.tbn*) and the TensorRT timing cache belong to the export."""
    from tbn_runtime.manifest import FORMAT, MANIFEST_NAME

    from .tensorrt_build import TIMING_CACHE

    entries = sorted(e for e in os.listdir(out) if not e.startswith(".tbn"))
    try:
        with open(os.path.join(out, MANIFEST_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return entries
    files = data.get("files") if isinstance(data.get("files"), dict) else {}
    own = {MANIFEST_NAME, TIMING_CACHE} | {n for n in files if isinstance(n, str)}
    return [e for e in entries if e not in own]


def install(tmp: str, out: str) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed after."""
    from tbn_runtime.files import backup_name, unmark_temporary_dir

    unmark_temporary_dir(tmp)
    backup = None
    if os.path.exists(out):
        backup = backup_name(out)
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def stamp_latest(out: str) -> None:
    """Stamp `out` as the export tbn-export made (or found up to date) last: tbn-run without
    --model takes the latest stamp under runs/tbn (tbn_runtime.segmenter.choose_export). The
    stamp is a hidden file inside the export; the manifest is left as it is."""
    from tbn_runtime.files import atomic_write_text
    from tbn_runtime.segmenter import EXPORTED_STAMP

    try:
        atomic_write_text(os.path.join(out, EXPORTED_STAMP),
                          json.dumps({"exported_at": time.time()}) + "\n")
    except OSError as e:  # the export itself is whole: say it, do not fail
        log.warning(f"could not stamp {out} as the latest export ({e})")
