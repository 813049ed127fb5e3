"""ONNX files on disk: the graph `model.onnx` and, for large models, its tensors in one `model.onnx.data`.

Protobuf cannot serialise a message over 2 GB, so a model whose tensors pass `EXTERNAL_BYTES` (1.8 GB, room
left for the graph) keeps them in one external file beside the graph. Every stage that writes ONNX ends
with that one layout, whatever wrote the file: the TorchScript exporter writes one file per tensor, named
after it; ONNX Runtime's quantizers write `<output>.data`; `move_model` turns either into the layout.
A model read from external data is written with external data too, whatever its new size.

    from compress.onnx_files import move_model, wants_external_data
    move_model(Path("tmp/export/model.onnx"), Path("art/model.onnx"))   # -> art/model.onnx(.data)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

EXTERNAL_BYTES = int(1.8 * 1024**3)
_ALIGN = 4096  # external tensors start on a page boundary, so ONNX Runtime can map them
_SMALL = 1024  # tensors below this stay in the graph (shapes, scales), as onnx.save does
_CHUNK = 64 * 1024**2


def data_file(path: Path) -> Path:
    """The external data file of the ONNX graph at `path`."""
    return path.with_name(path.name + ".data")


def external_files(path: Path) -> list[Path]:
    """The files the model's external tensors are read from (each once); refuses locations outside its folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = {_inside(path, ExternalDataInfo(t).location) for t in _get_all_tensors(model) if uses_external_data(t)}
    return sorted(files)


def model_bytes(path: Path) -> int:
    """Bytes on disk of the graph and every external file it reads."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))


def wants_external_data(path: Path) -> bool:
    """True when a model derived from the one at `path` should keep its tensors outside the graph."""
    return bool(external_files(path)) or path.stat().st_size > EXTERNAL_BYTES


def save_model(model, path: Path, *, external: bool) -> None:  # model: onnx.ModelProto
    """Write `model` as `path`, with its tensors in `data_file(path)` when `external`, replacing both atomically.

    onnx.save appends to an existing data file, so it writes into a fresh folder that is moved into place.
    """
    import onnx

    def write(tmp: Path) -> None:
        if external:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_file(path).name,
                size_threshold=_SMALL,
            )
        else:
            onnx.save_model(model, str(tmp))

    write_atomically(path, write)


def move_model(src: Path, dst: Path) -> None:
    """Write the model at `src` as `dst` in the one layout, streaming its tensors (a 2.4 GB model is never
    held in memory), then delete `src`'s files. External when `src` is (or is larger than `EXTERNAL_BYTES`);
    a graph without external data, or one already in the layout, is renamed as it is."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    sources = external_files(src)
    if not sources and src.stat().st_size <= EXTERNAL_BYTES:
        data_file(dst).unlink(missing_ok=True)
        os.replace(src, dst)
        return
    if sources == [data_file(src).resolve()] and src.name == dst.name:  # already the layout: rename
        os.replace(data_file(src), data_file(dst))
        os.replace(src, dst)
        return
    model = onnx.load(str(src), load_external_data=False)

    def write(tmp: Path) -> None:
        with open(data_file(tmp), "wb") as out:
            for tensor in _get_all_tensors(model):
                if uses_external_data(tensor):
                    copy_external(src, tensor, out, data_file(dst).name)
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= _SMALL:
                    data = tensor.raw_data
                    tensor.ClearField("raw_data")
                    append_external(out, tensor, data, data_file(dst).name)
        onnx.save_model(model, str(tmp))

    write_atomically(dst, write)
    for old in {src, *sources} - {dst, data_file(dst)}:
        old.unlink(missing_ok=True)


def write_atomically(dst: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_graph)` in a fresh folder beside `dst`, then move the graph and its data file (if
    written) into place; a stale data file of an earlier `dst` is removed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp / dst.name)
        if data_file(tmp / dst.name).exists():
            os.replace(data_file(tmp / dst.name), data_file(dst))
        else:
            data_file(dst).unlink(missing_ok=True)
        os.replace(tmp / dst.name, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def copy_model(src: Path, folder: Path) -> Path:
    """Copy the graph at `src` and its external files into `folder`; returns the copied graph.

    ONNX Runtime's quantizers write scratch files (`model-inferred.onnx`) beside their input: given the
    copy, they write into our folder, never into the parent artifact's. (onnx refuses external data read
    through a symlink or a hard link, so a link will not do.)
    """
    folder.mkdir(parents=True, exist_ok=True)
    for f in (src, *external_files(src)):
        shutil.copyfile(f, folder / f.name)
    return folder / src.name


def _inside(model: Path, location: str) -> Path:
    path = (model.parent / location).resolve()
    if path.parent != model.parent.resolve():
        raise ValueError(f"{model}: external data location {location!r} is outside the model's folder")
    return path


def append_external(out, tensor, data: bytes | memoryview, location: str) -> None:
    """Append `data` (`tensor`'s bytes) to the open data file `out` at the next page boundary; `tensor` then
    points at them in `location` (the file's name beside the graph)."""
    _pad(out)
    offset = out.tell()
    out.write(data)
    _point(tensor, location, offset, out.tell() - offset)


def copy_external(src: Path, tensor, out, location: str) -> None:
    """Append `tensor`'s bytes from its external file to `out`; `tensor` then points at them in `location`."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    file = _inside(src, info.location)
    start = int(info.offset or 0)
    length = int(info.length) if info.length is not None else file.stat().st_size - start
    _pad(out)
    offset = out.tell()
    with open(file, "rb") as f:
        f.seek(start)
        left = length
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise ValueError(f"{file}: external data of {tensor.name!r} ends before its length {length}")
            out.write(chunk)
            left -= len(chunk)
    _point(tensor, location, offset, length)


def _point(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _pad(out) -> None:
    out.write(b"\0" * (-out.tell() % _ALIGN))
