"""Where a model's files live on a node when a spec asks for a hostPath cache. Pure: no I/O.

A hostPath is a node directory, so the spec's path is input from a tenant the operator does not trust:
- it must be one of the roots the admin allows (``Settings.host_path_roots``; none by default), named
  exactly, so no tenant picks a node directory and no two roots nest;
- the pod mounts only a directory of the model's own under that root, never the root, and only that
  directory is handed (chowned, not recursively) to the downloader's uid;
- a single-file model with a sha256 shares one content-addressed directory (``sha256-<hex>``) with every
  model of the same digest, in any namespace: the downloader verifies a file there before reusing it and
  renames a download into place only after it verified, so what lies there under its final name is that
  content. Anything else (no digest, or a split model whose later shards no digest covers) gets
  ``<namespace>/<name>``: namespaces and names are DNS labels, so no model's directory is inside another's,
  and ``sha256-`` plus 64 hex digits is longer than any namespace.
"""

from __future__ import annotations

from .api import ModelDeploymentSpec
from .settings import Settings, normal_dir


def host_path_problem(spec: ModelDeploymentSpec, settings: Settings) -> str | None:
    """Why the spec's hostPath cache is refused, or None (no hostPath, or an allowed root)."""
    cache = spec.model_cache
    if cache is None or cache.host_path is None:
        return None
    path = cache.host_path.path
    norm = normal_dir(path)
    if norm is None:
        return f"spec.modelCache.hostPath.path {path!r} is not an absolute directory without '.', '..' or empty parts"
    if not settings.host_path_roots:
        return (
            f"spec.modelCache.hostPath.path {path}: this operator allows no hostPath cache (an admin can allow "
            "node directories with `modelfit run --host-path-root`, chart value hostPathCache.roots); "
            "use emptyDir or pvc"
        )
    if norm not in settings.host_path_roots:
        allowed = ", ".join(settings.host_path_roots)
        return f"spec.modelCache.hostPath.path {path} is not an allowed cache root; allowed: {allowed}"
    return None


def host_cache_dir(root: str, namespace: str, name: str, sha256: str | None, split: bool) -> str:
    """The node directory a model's pods mount (see the module docstring)."""
    base = normal_dir(root) or root
    if sha256 and not split:
        return f"{base}/sha256-{sha256.strip().lower()}"
    return f"{base}/{namespace}/{name}"
