"""The PEP 517 build backend of the m3ipc package, written with the standard library only.

Why a backend of our own: the package is one pure-Python module, and building it must work
offline on a fresh Debian machine. setuptools before 70.1 cannot build a wheel without the
separate ``wheel`` distribution, which neither a pyenv interpreter nor a fresh venv has, and
build isolation would try to download both. This backend needs nothing: ``pip install
./python`` (or ``--no-index``, or ``--no-build-isolation``) works with any pip that reads
``backend-path`` (pip 20 and later).

Hooks: ``build_wheel``, ``build_sdist``, ``build_editable`` (a ``.pth`` file pointing at
this source tree) and the ``get_requires_*`` hooks, which ask for nothing. The wheel is
``py3-none-any``; its ``RECORD`` holds the sha256 and size of every file.
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile

# The package's source folder (this file lives in python/build_backend/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "m3ipc"


def _project():
    """The [project] table of pyproject.toml: name, version, description, requires-python,
    license text. tomllib where Python has it (3.11+), else a reader for the flat
    ``key = "value"`` lines this file uses."""
    path = os.path.join(ROOT, "pyproject.toml")
    try:
        import tomllib
    except ImportError:
        tomllib = None
    if tomllib is not None:
        with open(path, "rb") as f:
            project = tomllib.load(f)["project"]
        lic = project.get("license", {})
        return {
            "name": project["name"],
            "version": project["version"],
            "description": project.get("description", ""),
            "requires-python": project.get("requires-python", ""),
            "license": lic.get("text", "") if isinstance(lic, dict) else str(lic),
        }
    fields = {}
    section = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            head = re.fullmatch(r"\[([^\]]+)\]", line)
            if head:
                section = head.group(1)
                continue
            if section != "project":
                continue
            kv = re.fullmatch(r'([A-Za-z-]+)\s*=\s*"(.*)"', line)
            if kv:
                fields[kv.group(1)] = kv.group(2)
            lic = re.fullmatch(r'license\s*=\s*\{\s*text\s*=\s*"(.*)"\s*\}', line)
            if lic:
                fields["license"] = lic.group(1)
    for key in ("description", "requires-python", "license"):
        fields.setdefault(key, "")
    return fields


def _dist_name(p):
    return re.sub(r"[-_.]+", "_", p["name"]).lower()


def _metadata(p):
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {p['name']}",
        f"Version: {p['version']}",
        f"Summary: {p['description']}",
    ]
    if p["requires-python"]:
        lines.append(f"Requires-Python: {p['requires-python']}")
    if p["license"]:
        lines.append(f"License: {p['license']}")
    return "\n".join(lines) + "\n"


def _package_files():
    """(path in the wheel, path on disk) of every file of the package, in a stable order."""
    out = []
    base = os.path.join(ROOT, PACKAGE)
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            disk = os.path.join(folder, name)
            rel = os.path.relpath(disk, ROOT).replace(os.sep, "/")
            out.append((rel, disk))
    return out


def _write_wheel(wheel_directory, entries):
    """Writes a py3-none-any wheel of `entries` ((name, bytes) pairs) plus its dist-info;
    returns the file's base name."""
    p = _project()
    dist = _dist_name(p)
    info = f"{dist}-{p['version']}.dist-info"
    entries = list(entries) + [
        (f"{info}/METADATA", _metadata(p).encode()),
        (f"{info}/WHEEL", (
            "Wheel-Version: 1.0\n"
            "Generator: m3ipc_build\n"
            "Root-Is-Purelib: true\n"
            "Tag: py3-none-any\n").encode()),
    ]
    record = []
    for name, data in entries:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    filename = f"{dist}-{p['version']}-py3-none-any.whl"
    os.makedirs(wheel_directory, exist_ok=True)
    # A fixed date, so that two builds of the same files give the same wheel.
    stamp = (1980, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w",
                         zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, stamp)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    return filename


def get_requires_for_build_wheel(config_settings=None):
    """Nothing beyond the standard library."""
    return []


def get_requires_for_build_sdist(config_settings=None):
    """Nothing beyond the standard library."""
    return []


def get_requires_for_build_editable(config_settings=None):
    """Nothing beyond the standard library."""
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    """A wheel with the package's files."""
    entries = []
    for rel, disk in _package_files():
        with open(disk, "rb") as f:
            entries.append((rel, f.read()))
    return _write_wheel(wheel_directory, entries)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """A wheel whose .pth file puts this source tree on sys.path (pip install -e)."""
    return _write_wheel(wheel_directory, [(f"_{PACKAGE}_editable.pth", (ROOT + "\n").encode())])


def build_sdist(sdist_directory, config_settings=None):
    """A .tar.gz of pyproject.toml, this backend and the package, with PKG-INFO."""
    p = _project()
    top = f"{_dist_name(p)}-{p['version']}"
    filename = f"{top}.tar.gz"
    files = [("pyproject.toml", os.path.join(ROOT, "pyproject.toml")),
             ("build_backend/m3ipc_build.py", os.path.abspath(__file__))]
    files += _package_files()
    os.makedirs(sdist_directory, exist_ok=True)
    now = int(time.time())
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz",
                      format=tarfile.PAX_FORMAT) as t:
        def add(name, data):
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.size = len(data)
            ti.mtime = now
            ti.mode = 0o644
            t.addfile(ti, io.BytesIO(data))
        for name, disk in files:
            with open(disk, "rb") as f:
                add(name, f.read())
        add("PKG-INFO", _metadata(p).encode())
    return filename
