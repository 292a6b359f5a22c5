"""SHA-256 checksums of a directory's files, written beside them and verified later.

    checksums.write(directory)            # directory/SHA256SUMS, one "digest  relative/path" line per file
    problem = checksums.verify(directory)  # None when every listed file is present and matches; else a sentence

The file uses the format of `sha256sum`, so `cd DIR && sha256sum -c SHA256SUMS` checks it by hand too.
"""
import hashlib
import os

MANIFEST = "SHA256SUMS"


class NoManifest(Exception):
  """The directory has no SHA256SUMS (written before checksums existed, or not yet written)."""


def _digest(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory):
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != MANIFEST:
        yield rel


def write(directory):
  """Writes directory/SHA256SUMS over every file below `directory` (atomically: a reader sees all or nothing)."""
  lines = [f"{_digest(os.path.join(directory, rel))}  {rel}\n" for rel in sorted(_files(directory))]
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, MANIFEST))


def read(directory):
  """{relative path: digest} of directory/SHA256SUMS; NoManifest when absent, ValueError when unparsable."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise NoManifest(path)
  expected = {}
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        digest, rel = raw.decode("utf-8").rstrip("\n").split("  ", 1)
      except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} line {number} is not 'digest  path'") from None
      if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{path} line {number} holds no SHA-256 digest")
      expected[rel] = digest
  if not expected:
    raise ValueError(f"{path} lists no files")
  return expected


def verify(directory):
  """None when every file listed in SHA256SUMS is present with its digest; otherwise what is wrong, in words.

  Raises NoManifest when the directory has no SHA256SUMS. Files not listed are ignored.
  """
  try:
    expected = read(directory)
  except ValueError as e:
    return f"its checksum file is damaged ({e})"
  for rel, digest in sorted(expected.items()):
    path = os.path.join(directory, rel)
    if not os.path.exists(path):
      return f"file {rel} is missing"
    if _digest(path) != digest:
      return f"file {rel} fails its SHA-256 checksum"
  return None
