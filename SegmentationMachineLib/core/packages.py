"""Installing optional packages into an application's Python (3D Slicer's) without touching its own."""

from importlib import metadata


def installed_pins() -> str:
    """pip constraints pinning every installed distribution at its version: an install may add packages,
    never replace one the application ships (pip would otherwise upgrade, say, Slicer's numpy for a
    newer requirement, in place)."""
    pins = {f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions() if dist.metadata["Name"]}
    return "\n".join(sorted(pins, key=str.lower)) + "\n"
