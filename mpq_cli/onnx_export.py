"""``mpq export RUN --format onnx``: an ONNX model other runtimes can run, weights kept as integer codes.

The model decoded from the run's packed encoding is exported with ``torch.onnx.export``
(opset 21), then each quantized layer's float weight initializer is replaced by its integer
codes and a ``DequantizeLinear`` (``codes * step``, the exact product the packed file
decodes to; steps per output channel are a 1-d scale on ``axis=0``, with no zero point):
INT4 when every code fits 4 bits signed, INT8 up to 8 bits, otherwise the float
weight stays, with a note. A PACT-quantized input becomes ``Clip`` + ``QuantizeLinear`` +
``DequantizeLinear`` (uint8 for the unsigned clip, int8 for the signed one; both round half
to even, as torch does). ALQ's binary bases and its basis activations have no ONNX operator:
those weights are stored decoded (float) and those inputs stay FP, and the report says so.
onnxruntime then runs a batch of the run's validation data and must match ``load_packed``'s
logits (1e-4 relative) and top-1.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import MpqError
from .forms import get_form, inferred_form

OPSET = 21
RELATIVE_TOLERANCE = 1e-4
INSTALL = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'mpq-cli[onnx]'"


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise MpqError(INSTALL) from None


def _code_type(codes: torch.Tensor):
    """The narrowest ONNX integer type the signed codes fit, or ``None``."""
    from onnx import TensorProto

    lowest, highest = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if -8 <= lowest and highest <= 7:
        return TensorProto.INT4, "int4"
    if -128 <= lowest and highest <= 127:
        return TensorProto.INT8, "int8"
    return None, None


def export_onnx(run_dir: str | Path, out: str | Path, batch=None) -> dict:
    """Write the ONNX model of a finished run and check it with onnxruntime; returns the report.

    ``batch``: the inputs onnxruntime and ``load_packed`` are compared on (default: the first
    batch of the run's validation data).
    """
    _require()
    import onnx
    from onnx import TensorProto, helper

    from .export import _read_codes, pack_run
    from .packing.format import load_packed, write_packed
    from .rundir import write_json

    run_dir, out = Path(run_dir), Path(out)
    if out.suffix.lower() != ".onnx":
        raise MpqError(f"--format onnx writes a .onnx file; give -o NAME.onnx, not {out.name!r}")
    packed = pack_run(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        packed_path = Path(tmp) / "model.safetensors"
        write_packed(packed_path, packed.header, packed.tensors)
        packed_bytes = packed_path.stat().st_size
        reference = load_packed(packed_path)
    plain = copy.deepcopy(reference)  # the graph to export; its input quantizers become ONNX ops below
    codes, forms = _read_codes(run_dir / "codes.safetensors")
    layers = {e["name"]: e for e in packed.header["layers"]}
    for name, entry in layers.items():
        if entry.get("act"):
            plain.get_submodule(name).input_quant = nn.Identity()
    spec = packed.header["model"]
    if batch is None:
        batch = _validation_batch(run_dir)
    example = batch[:1]
    with torch.no_grad():
        program = torch.onnx.export(
            plain,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            optimize=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    model = program.model_proto
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    weights, notes = {}, []
    new_nodes = []
    for name, entry in layers.items():
        weight_name = f"{name}.weight"
        if entry.get("nominal_bits") is None:
            weights[name] = "FP32 (kept by the run)"
            continue
        if weight_name not in initializers:
            raise MpqError(f"internal error: the exported graph has no initializer {weight_name}")
        recorded = (forms or {}).get(name, {}).get("weight")
        form = get_form(recorded) if recorded is not None else inferred_form(name, codes)
        pair = form.dequantize_pair(name, codes)
        if isinstance(pair, str):  # the form has no integer representation: the decoded weight stays
            weights[name] = pair
            continue
        layer_codes, step = pair
        onnx_type, type_name = _code_type(layer_codes)
        if onnx_type is None:
            weights[name] = "FP32 (codes need more than 8 bits)"
            notes.append(f"{name}: codes up to {int(layer_codes.abs().max())} need more than 8 bits; stored as FP32")
            continue
        graph.initializer.remove(initializers[weight_name])
        graph.initializer.append(_integer_tensor(f"{name}.weight_codes", onnx_type, layer_codes))
        # one scale (0-d), or one per output channel: a 1-d scale of length C on axis 0 (per-axis dequantization)
        per_channel = {"axis": 0} if step.dim() == 1 else {}
        graph.initializer.append(
            helper.make_tensor(f"{name}.weight_step", TensorProto.FLOAT, list(step.shape), step.reshape(-1).tolist())
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}.weight_codes", f"{name}.weight_step"],
                [weight_name],
                name=f"{name}.dq",
                **per_channel,
            )
        )
        weights[name] = type_name
    activations = _quantize_inputs(graph, layers, packed.tensors, notes)
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    tmp_out = out.with_name(f".{out.name}.tmp")
    onnx.save(model, tmp_out)
    quantized_inputs = [n for n, kind in activations.items() if kind.startswith("int8") or kind.startswith("uint8")]
    check = _check_with_onnxruntime(tmp_out, reference, batch, quantized_inputs)
    tmp_out.replace(out)
    report = {
        "command": "export",
        "format": "onnx",
        "opset": OPSET,
        "model": spec["name"],
        "method": packed.header["method"],
        "out": str(out),
        "onnx_bytes": out.stat().st_size,
        "packed_bytes": packed_bytes,
        "weights": weights,
        "activations": activations,
        "notes": notes,
        "input": "normalised images, as the packed model takes them (mean/std in the packed header)",
        **check,
    }
    report_path = out.with_name(f"{out.name}.report.json")
    write_json(report_path, report)
    return {**report, "report": str(report_path)}


def _integer_tensor(name: str, onnx_type, codes: torch.Tensor):
    """An INT4 or INT8 initializer in raw bytes (the default int32_data field spends up to 10 bytes a code)."""
    import numpy as np
    from onnx import TensorProto, helper

    flat = codes.flatten().numpy().astype(np.int8)
    if onnx_type == TensorProto.INT4:  # two codes a byte, the first in the low nibble (the ONNX layout)
        nibbles = (flat & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        raw = flat.tobytes()
    return helper.make_tensor(name, onnx_type, list(codes.shape), raw, raw=True)


def _quantize_inputs(graph, layers: dict, tensors: dict, notes: list[str]) -> dict:
    """Insert Clip + QuantizeLinear + DequantizeLinear before each PACT-quantized layer."""
    from onnx import TensorProto, helper

    from .quant.primitives import max_code

    consumers = {}
    for index, node in enumerate(graph.node):
        if len(node.input) > 1:
            consumers.setdefault(node.input[1], index)
    done = {}
    inserts = []
    for name, entry in layers.items():
        act = entry.get("act")
        if not act:
            continue
        if act.get("kind") == "basis":
            done[name] = "FP (ALQ basis activation: no ONNX operator)"
            notes.append(f"{name}: its input's ALQ levels are not expressible in ONNX and stay FP")
            continue
        signed, bits = bool(act["signed"]), int(act["bits"])
        levels = (max_code(bits - 1) or 1) if signed else max_code(bits)
        if levels > (127 if signed else 255):
            done[name] = f"FP ({bits}-bit input: wider than 8 bits)"
            notes.append(f"{name}: its {bits}-bit input quantization is wider than ONNX's 8-bit types; stays FP")
            continue
        # the same float32 arithmetic as PACT: alpha = |a| + 1e-8, step = alpha / levels
        alpha = tensors[f"{name}.input_quant.alpha"].float().abs() + 1e-8
        step = alpha / levels
        low = -alpha if signed else torch.zeros_like(alpha)
        index = consumers.get(f"{name}.weight")
        if index is None:
            raise MpqError(f"internal error: no node reads {name}.weight in the exported graph")
        source = graph.node[index].input[0]
        prefix = f"{name}.input_quant"
        zero_type = TensorProto.INT8 if signed else TensorProto.UINT8
        initial = [
            helper.make_tensor(f"{prefix}.low", TensorProto.FLOAT, [], [float(low)]),
            helper.make_tensor(f"{prefix}.alpha", TensorProto.FLOAT, [], [float(alpha)]),
            helper.make_tensor(f"{prefix}.step", TensorProto.FLOAT, [], [float(step)]),
            helper.make_tensor(f"{prefix}.zero", zero_type, [], [0]),
        ]
        graph.initializer.extend(initial)
        nodes = [
            helper.make_node("Clip", [source, f"{prefix}.low", f"{prefix}.alpha"], [f"{prefix}.clipped"]),
            helper.make_node(
                "QuantizeLinear", [f"{prefix}.clipped", f"{prefix}.step", f"{prefix}.zero"], [f"{prefix}.q"]
            ),
            helper.make_node("DequantizeLinear", [f"{prefix}.q", f"{prefix}.step", f"{prefix}.zero"], [f"{prefix}.dq"]),
        ]
        inserts.append((index, nodes))
        graph.node[index].input[0] = f"{prefix}.dq"
        done[name] = f"{'int8' if signed else 'uint8'} ({bits} bits, clip {'[-a, a]' if signed else '[0, a]'})"
    for index, nodes in sorted(inserts, key=lambda item: -item[0]):  # from the back: indices stay valid
        for node in reversed(nodes):
            graph.node.insert(index, node)
    return done


def _check_with_onnxruntime(path: Path, reference: nn.Module, batch: torch.Tensor, quantized_inputs: list[str]) -> dict:
    """onnxruntime against ``load_packed`` on ``batch``.

    Without quantized inputs the logits must agree to 1e-4 of the largest logit and every top-1
    must be equal. With them, onnxruntime's own summation order moves a few pre-activation values
    across a rounding threshold of the next quantizer (one step apart), so end-to-end logits
    cannot agree to 1e-4: each quantizer is checked op for op instead (onnxruntime's Clip +
    QuantizeLinear + DequantizeLinear on the exact input PACT saw must give PACT's output bit for
    bit), and a top-1 may differ only on an image whose top-2 logits load_packed puts closer than
    twice the largest logit difference measured (a near tie); the differences and flips are reported.
    """
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    got = session.run(None, {input_name: batch.numpy()})[0]
    seen = {}
    hooks = [
        reference.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0].detach().clone()), prepend=True
        )
        for name in quantized_inputs
    ]
    try:
        with torch.no_grad():
            expected = reference(batch).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    scale = float(np.abs(expected).max()) or 1.0
    worst = float(np.abs(got - expected).max()) / scale
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    result = {"checked_images": int(batch.shape[0]), "max_relative_difference": worst, "top1_agreement": agree}
    if quantized_inputs:
        result["quantizers_exact"] = _check_quantizers(path, reference, seen)
        # a top-1 may differ only where load_packed's own top-2 margin is within the logits' measured difference
        top2 = np.sort(expected, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        differ = got.argmax(1) != expected.argmax(1)
        explained = margin <= 2 * float(np.abs(got - expected).max(axis=1).max())
        result["top1_flips_at_near_ties"] = int(differ.sum())
        ok = bool((~differ | explained).all())
    else:
        ok = worst <= RELATIVE_TOLERANCE and agree == 1.0
    if not ok:
        raise MpqError(
            f"onnxruntime's logits differ from load_packed's (largest difference {worst:.2e} of the largest logit, "
            f"top-1 equal on {100 * agree:.1f} % of {batch.shape[0]} images); the ONNX file was not written"
        )
    return result


def _check_quantizers(path: Path, reference: nn.Module, seen: dict) -> int:
    """Run each quantizer's three ONNX nodes alone, on the input PACT saw; their output must be PACT's exactly."""
    import onnx
    import onnxruntime
    from onnx import helper

    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    for name, x in seen.items():
        prefix = f"{name}.input_quant"
        nodes = [n for n in model.graph.node if n.output and n.output[0].startswith(prefix + ".")]
        nodes = [
            helper.make_node(n.op_type, [i if i != nodes[0].input[0] else "x" for i in n.input], list(n.output))
            for n in nodes
        ]
        inits = [initializers[i] for n in nodes for i in n.input if i in initializers]
        graph = helper.make_graph(
            nodes,
            "quantizer",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info(f"{prefix}.dq", onnx.TensorProto.FLOAT, list(x.shape))],
            list({i.name: i for i in inits}.values()),
        )
        single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        session = onnxruntime.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"x": x.float().numpy()})[0])
        with torch.no_grad():
            expected = reference.get_submodule(name).input_quant(x)
        if not torch.equal(got, expected.float()):
            differ = int((got != expected).sum())
            raise MpqError(f"internal error: the ONNX quantizer of {name} differs from PACT on {differ} values")
    return len(seen)


def _validation_batch(run_dir: Path) -> torch.Tensor:
    """The first batch of the run's validation data (its recorded dataset, on this machine)."""
    from .data import load_data
    from .record import RunRecord

    record = RunRecord.load(run_dir)
    data = record.data({"limit_val_batches": 1})
    model = record.model_dict()
    _, _, val = load_data(
        data, channels=model["in_channels"], default_input=(model["in_channels"], *model["input_size"]), seed=0
    )
    for x, _ in val:
        return x.float().cpu()
    raise MpqError(f"{run_dir}: its validation data is empty")
