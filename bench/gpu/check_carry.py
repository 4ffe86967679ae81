"""Checks that the wheels carried to the GPU machine are complete: exactly the pins in
wheels.txt, one version each, and every requirement they name (for CPython 3.12 on Linux,
extras left out) either carried too or on the machine's image (device-packages.txt, with the
version checked where it is known). Exits non-zero, naming each problem, otherwise.

usage: check_carry.py WHEEL_DIR
"""

import pathlib
import sys
import zipfile

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version

HERE = pathlib.Path(__file__).parent


def listed(path):
    """{name: version or None} from a file of `name` / `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def main(wheel_dir):
    wheels = sorted(pathlib.Path(wheel_dir).glob("*.whl"))
    pins, device = listed(HERE / "wheels.txt"), listed(HERE / "device-packages.txt")
    env = default_environment()
    env.update(python_version="3.12", python_full_version=device.get("python") or "3.12.3",
               sys_platform="linux", platform_system="Linux", implementation_name="cpython")
    problems, carried = [], {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        if not wheel.name.endswith("-py3-none-any.whl"):
            problems.append(f"{wheel.name}: not a pure-Python wheel")
        if canonicalize_name(name) in carried:
            problems.append(f"{name}: two versions carried (pip would stop)")
        carried[canonicalize_name(name)] = version
    for name, version in pins.items():
        if carried.get(name) != version:
            problems.append(f"{name}=={version}: pinned in wheels.txt, carried: {carried.get(name)}")
    for wheel in wheels:
        for line in metadata(wheel).splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in carried:
                have, where = carried[name], "carried"
            elif name in device:
                have, where = device[name], "on the machine"  # None: version not known
            else:
                problems.append(f"{wheel.name} needs {req}: neither carried nor on the GPU machine")
                continue
            if have is not None and req.specifier and Version(have) not in req.specifier:
                problems.append(f"{wheel.name} needs {req}: {where} is {have}")
            else:
                print(f"ok: {wheel.name.split('-')[0]} needs {req}: {where}" + (f" ({have})" if have else ""))
    for p in problems:
        print("MISSING:", p)
    print(f"{len(wheels)} wheels, {len(problems)} problems")
    return 1 if problems or not wheels else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
