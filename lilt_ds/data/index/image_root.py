"""Where the images of an annotation file live, so downloaded JSON files never need editing.

`data.image_root` takes one of three forms:

- `None`: every path in the JSON must already be absolute.
- `"/root"`: relative paths are joined to `/root`; absolute paths are kept.
- `{"from": "/old/prefix", "to": "/new/prefix"}`: absolute paths that start with `/old/prefix`
  get that prefix replaced by `/new/prefix` (for JSON files written on another machine); other
  absolute paths are kept; relative paths are an error.
"""

import os

from ..errors import DataError

ImageRootSpec = str | dict | None


class ImageRoot:
    """Resolves the image path of one entry according to an `image_root` setting."""

    def __init__(self, spec: ImageRootSpec = None, setting: str = "data.image_root"):
        self.setting = setting
        self.root: str | None = None
        self.prefix_from: str | None = None
        self.prefix_to: str | None = None
        if spec is None:
            return
        if isinstance(spec, (str, os.PathLike)):
            if not str(spec):
                raise DataError(f"{setting} is an empty string; give a folder, or null.")
            self.root = str(spec)
            return
        if isinstance(spec, dict):
            if set(spec) != {"from", "to"} or not all(isinstance(v, str) and v for v in spec.values()):
                raise DataError(
                    f"{setting} = {spec!r}: a prefix rewrite needs exactly two non-empty strings, "
                    '{"from": "/old/prefix", "to": "/new/prefix"}.'
                )
            self.prefix_from = spec["from"].rstrip("/")  # "/" becomes "": every absolute path
            self.prefix_to = spec["to"].rstrip("/")
            return
        raise DataError(
            f'{setting} = {spec!r}: expected null, a folder string, or {{"from": "/old/prefix", "to": "/new/prefix"}}.'
        )

    def resolve(self, path: str) -> str | None:
        """The path to open, or None when a relative path has no root to resolve it against."""
        if self.root is not None:
            return os.path.join(self.root, path)
        if not os.path.isabs(path):
            return None
        if self.prefix_from is not None and (path == self.prefix_from or path.startswith(self.prefix_from + "/")):
            return self.prefix_to + path[len(self.prefix_from) :]
        return path

    def missing_root_fix(self) -> str:
        """What to tell a user whose entry has a relative path we cannot resolve."""
        if self.prefix_from is not None:
            return (
                f"a prefix rewrite in {self.setting} only applies to absolute paths; "
                f"set {self.setting} to the folder the relative paths start from"
            )
        return f"set {self.setting} to the folder the relative paths start from"
