"""Convert the official bf16 DiT shards into one scaled-fp8 ``.safetensors`` file.

    python -m stepvideo_core.convert models/diffusion_models/stepvideo-t2v stepvideo-t2v-fp8_scaled.safetensors

The transformer blocks' Linear weights become ``float8_e4m3fn`` with a per-output-channel
fp32 ``<layer>.scale_weight`` [out, 1] next to each (see :mod:`stepvideo_core.fp8`);
every other tensor is written in ``--dtype`` (bf16 by default).  Any Step-Video DiT converts
the same way: T2V, Turbo or TI2V (whose 128-channel patch embed and motion-score embedder are
not block Linears, so they stay in ``--dtype``; the result loads as TI2V, told from them).  The result is
about 30 GB instead of 58.7 GB and loads with ``load_transformer(path)`` (auto-detected).

It streams: the output header is computed from the source headers alone, then each
tensor is read, converted, written and dropped before the next one is read, so the
peak memory is one tensor (the largest is 604 MB in bf16) plus small fp32
temporaries, never the model.  The file is written under a temporary name and
renamed when complete, so an interrupted run never leaves a truncated model behind.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from safetensors import safe_open

from . import fp8
from .checkpoint import CheckpointError, check_keys, read_header
from .dit.loader import FP8_PREFIX, find_transformer_files, resolve_config
from .dit.model import build_transformer
from .dtypes import DTYPES

ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.bfloat16: "BF16",
             torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
             torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}


def write_safetensors_streaming(path, entries: Sequence[tuple[str, torch.dtype, tuple]],
                                produce: Callable[[str], torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time, in ``entries`` order.

    ``entries`` gives (name, dtype, shape) of every tensor up front (the header needs
    all offsets before the first byte of data); ``produce(name)`` returns the tensor,
    which must have exactly that dtype and shape.  Only one tensor is held at a time.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, dtype, shape in entries:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, "
                                   f"the header says {dtype} {list(shape)}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            out.write(memoryview(data.numpy()))
            del tensor, data


def plan_conversion(src, dtype: torch.dtype = torch.bfloat16):
    """(source index, config, output entries, quantised weight names) for converting ``src``.

    Checks the source strictly first (exact official names and shapes), so nothing is
    written for a file that is not a Step-Video DiT or is already quantised.
    """
    index, config_path = find_transformer_files(src)
    if fp8.is_scaled_fp8_file({k: e.dtype for k, e in index.items()}):
        raise CheckpointError(f"{index.source} is already an fp8 checkpoint; nothing to convert")
    config = resolve_config(index, config_path)
    model = build_transformer(config, device="meta", operations=fp8.scaled_fp8)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, index,
               f"a Step-Video DiT with {config.num_layers} blocks")
    quantised = {f"{name}.weight" for name in fp8.fp8_layers(model, FP8_PREFIX)}
    entries = []
    for name in sorted(index, key=lambda k: (str(index[k].file), k)):  # one source file open at a time
        entry = index[name]
        if name in quantised:
            entries.append((name, fp8.FP8, entry.shape))
            entries.append((name[:-len(".weight")] + fp8.SCALE_SUFFIX, torch.float32, (entry.shape[0], 1)))
        else:
            source = FROM_ST.get(entry.dtype)
            floating = source is not None and source.is_floating_point
            entries.append((name, dtype if floating else source, entry.shape))
    entries.append((fp8.MARKER_KEY, fp8.FP8, (0,)))
    return index, config, entries, quantised


def convert_to_fp8(src, dst, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                   progress: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Write the scaled-fp8 single file for the DiT at ``src`` to ``dst``; returns ``dst``.

    ``progress(i, n, name)`` is called after each source tensor.  Raises
    CheckpointError for unusable sources and FileExistsError unless ``overwrite``.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite to replace it)")
    index, config, entries, quantised = plan_conversion(src, dtype)
    handles: dict = {}
    pending: dict[str, torch.Tensor] = {}
    done = [0]

    def read(name: str) -> torch.Tensor:
        entry = index[name]
        if entry.file not in handles:
            for old in list(handles):  # keep one source shard open
                handles.pop(old).__exit__(None, None, None)
            handles[entry.file] = safe_open(str(entry.file), framework="pt", device="cpu").__enter__()
        return handles[entry.file].get_tensor(entry.stored_name)

    def produce(name: str) -> torch.Tensor:
        if name == fp8.MARKER_KEY:
            return torch.empty(0, dtype=fp8.FP8)
        if name in pending:
            return pending.pop(name)
        tensor = read(name)
        done[0] += 1
        if progress:
            progress(done[0], len(index), name)
        if name in quantised:
            w8, scale = fp8.quantize_weight(tensor)
            pending[name[:-len(".weight")] + fp8.SCALE_SUFFIX] = scale.reshape(-1, 1)
            return w8
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    metadata = {"format": "pt", "stepvideo_weight_format": "fp8_scaled",
                "stepvideo_fp8": "float8_e4m3fn weights of transformer_blocks.*.Linear, per-output-channel fp32 "
                                 "scale_weight [out, 1]; weight ~= fp8 * scale_weight",
                "stepvideo_config": json.dumps(config.to_dict())}
    tmp = dst.with_name(dst.stem + ".partial" + dst.suffix)
    try:
        write_safetensors_streaming(tmp, entries, produce, metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    read_header(tmp)  # the written file must parse
    os.replace(tmp, dst)
    return dst


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_core.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="stepvideo-t2v folder, its transformer/ folder, or a bf16 .safetensors file")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of the tensors that stay unquantised (default bf16, as released)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(list(argv) if argv is not None else None)
    start = time.perf_counter()

    def report(i: int, n: int, name: str) -> None:
        if i == n or i % 50 == 0:
            print(f"  {i}/{n} tensors ({name})", flush=True)

    try:
        out = convert_to_fp8(args.src, args.dst, DTYPES[args.dtype], args.overwrite, report)
    except (CheckpointError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
