"""Extract uploaded zip archives safely into a scratch folder (never beside the user's files).

Members that would escape the folder, links, and members that are too big or compressed too
well (zip bombs) are refused one by one with a reason; an archive that is too big as a whole,
or not a readable zip, is refused whole.
"""

import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 8 * 1024 ** 3  # a whole CT study compresses to far less
    max_member_bytes: int = 2 * 1024 ** 3
    max_ratio: float = 200.0  # DICOM compresses 2-10x; zip bombs reach thousands
    max_members: int = 100_000


@dataclass
class Extraction:
    folder: Path
    files: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # (member name, reason)


def _member_problem(info: zipfile.ZipInfo, limits: ArchiveLimits):
    name = PurePosixPath(info.filename.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
        return "its path leads outside the archive's folder"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "it is a link"
    if info.file_size > limits.max_member_bytes:
        return f"it unpacks to {info.file_size / 1024 ** 3:.1f} GiB, over the limit"
    if info.compress_size and info.file_size / info.compress_size > limits.max_ratio and info.file_size > 1024 ** 2:
        return f"it is compressed {info.file_size / info.compress_size:.0f}:1, like a zip bomb"
    return None


def extract_zip(archive: Path, destination: Path, limits: ArchiveLimits = ArchiveLimits()) -> Extraction:
    """Extracts archive into destination (created; must not exist); returns what was written and refused."""
    result = Extraction(folder=destination)
    try:
        with zipfile.ZipFile(archive) as package:
            members = [m for m in package.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if len(members) > limits.max_members or total > limits.max_total_bytes:
                result.refused.append(("*", f"the archive unpacks to {len(members)} files and "
                                            f"{total / 1024 ** 3:.1f} GiB, over the limits"))
                return result
            partial = destination.with_name(destination.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for member in members:
                problem = _member_problem(member, limits)
                if problem:
                    result.refused.append((member.filename, problem))
                    continue
                target = partial.joinpath(*PurePosixPath(member.filename.replace("\\", "/")).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with package.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1024 * 1024)
                result.files.append(destination / target.relative_to(partial))
            partial.rename(destination)  # the scratch copy appears whole or not at all
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        result.refused.append(("*", f"the archive cannot be read ({error})"))
        result.files = []
    return result
