"""``adamae-convert``: get weights out of a sharded run and into other tools, and bring weights in.

Every user error (a wrong path, a checkpoint of another architecture, an unsafe pickle, a bad option)
ends with one line on stderr, ``adamae-convert: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .errors import ConvertError

PROG = "adamae-convert"
DTYPE_CHOICES = ("fp32", "bf16")


class _UsageError(ConvertError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so ``main`` can return 2 instead of exiting)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose lines to the terminal; keeps indented lines (key tables, examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if line.startswith(" ") or not line.strip():
                lines.append(indent + line)
            else:
                lines.extend(textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes (also used by ``adamae-visualize``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_architecture_options(parser: argparse.ArgumentParser, for_import: bool) -> None:
    group = parser.add_argument_group(
        "architecture",
        "Shapes tell widths, depths, channels, tubelet and patch size; the rest comes from these options, then the "
        "checkpoint's args, then the defaults of the size of the same width."
        if for_import
        else "By default the checkpoint's own config.json (written by adamae-pretrain). With --model, or for a "
        "checkpoint "
        "without config.json, the architecture is read from the weights' shapes as for 'import' and completed by "
        "these options; the weights must fit it exactly, or the command stops.",
    )
    group.add_argument(
        "--model",
        metavar="NAME",
        help="a size from configs/model/ (vit_tiny ... vit_giant): its widths "
        "and depths must match the weights; it gives the attention head counts",
    )
    group.add_argument(
        "--num-heads",
        type=positive_int,
        metavar="N",
        help="encoder attention heads (not visible in shapes; default: from --model"
        + (", args.model" if for_import else "")
        + " or the size of the same width)",
    )
    group.add_argument("--decoder-num-heads", type=positive_int, metavar="N", help="decoder attention heads")
    group.add_argument("--num-frames", type=positive_int, metavar="T", help="frames per clip the model was trained on")
    group.add_argument(
        "--img-size", type=positive_int, nargs="+", metavar="PX", help="frame size: one value (square) or HEIGHT WIDTH"
    )
    group.add_argument(
        "--tubelet-size", type=positive_int, metavar="T", help="frames per token (must match the weights)"
    )
    group.add_argument(
        "--patch-size", type=positive_int, metavar="PX", help="pixels per token side (must match the weights)"
    )
    group.add_argument(
        "--masking",
        choices=("adaptive", "random", "tube"),
        help="masking strategy (default: adaptive when the weights include a token sampler, else "
        + ("the checkpoint's args.mask_type, else tube)" if for_import else "tube)"),
    )
    group.add_argument(
        "--mask-ratio",
        type=float,
        metavar="R",
        help="masking ratio (default: " + ("args.mask_ratio, else " if for_import else "") + "the strategy's default)",
    )


def _add_output_options(parser: argparse.ArgumentParser, dtype_default: str | None, dtype_help: str) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=dtype_default, help=dtype_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it exists (the old folder stays until the new one is complete)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Checkpoint tools for adamae_scale: consolidate DeepSpeed ZeRO checkpoints, export the encoder or "
        "a "
        "Hugging Face VideoMAE model, import reference AdaMAE/VideoMAE checkpoints. Outputs are folders "
        "holding model.safetensors + config.json, written atomically. No tool un-pickles anything but "
        "tensors, plain containers and a short allowlist of classes.",
        epilog="Run 'adamae-convert COMMAND --help' for each command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formatter = _HelpFormatter

    consolidate = commands.add_parser(
        "consolidate",
        formatter_class=formatter,
        help="DeepSpeed ZeRO 0-3 (or engine=fairscale) checkpoint -> one model.safetensors of the fp32 master weights",
        description="Reassemble a DeepSpeed ZeRO 0-3 checkpoint of any world size (written by adamae-pretrain) into "
        "one "
        "model.safetensors holding the optimizer's fp32 master weights bit for bit (or bf16 with --dtype "
        "bf16), plus config.json describing the model (format 'adamae-full'). ZeRO-1/2/3 go through "
        "DeepSpeed's own zero_to_fp32, with files memory-mapped and tensors written one at a time: peak "
        "memory is about one fp32 copy of the model. An engine=fairscale checkpoint (fairscale.json in the tag "
        "folder) already holds the full fp32 weights in its model.safetensors; they are copied bit for bit. "
        "A checkpoint of adamae-finetune becomes a classifier folder (format 'adamae-classifier', what the run "
        "writes to RUN_DIR/model when it finishes), or with --ema its model EMA (RUN_DIR/model_ema).",
        epilog="examples:\n  adamae-convert consolidate runs/try/checkpoints exported/try\n"
        "  adamae-convert consolidate runs/try/checkpoints/step_00000030 exported/try-30 --dtype bf16\n"
        "  adamae-convert consolidate runs/ft exported/ft-ema --ema",
    )
    consolidate.add_argument(
        "ckpt_dir",
        metavar="CKPT_DIR",
        help="a checkpoint tag folder (RUN_DIR/checkpoints/step_00000030), the checkpoints folder "
        "(its 'latest' tag is used) or RUN_DIR",
    )
    consolidate.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    consolidate.add_argument("--tag", help="checkpoint tag to use instead of 'latest' (e.g. step_00000030)")
    consolidate.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write weights holding NaN/inf instead of refusing (the checkpoint's manifest is still verified)",
    )
    consolidate.add_argument(
        "--ema",
        action="store_true",
        help="a fine-tuning checkpoint's model EMA (finetune.model_ema=true) instead of its trained weights",
    )
    _add_output_options(
        consolidate, "fp32", "dtype of the written weights (default fp32, bit-identical to the masters)"
    )
    _add_architecture_options(consolidate, for_import=False)

    encoder = commands.add_parser(
        "export-encoder",
        formatter_class=formatter,
        help="the encoder alone (no sampler, no decoder), for fine-tuning",
        description="Write only the encoder of a consolidated (or imported) model: config.json (format "
        "'adamae-encoder', with the encoder's widths, token grid and key layout) + model.safetensors.\n\n"
        "key layout 'adamae' (default; also the reference VideoMAE/AdaMAE fine-tuning ViT's names):\n"
        "  patch_embed.proj.{weight [D,C,t,p,p], bias}  Conv3d; tokens ordered (time, row, column)\n"
        "  blocks.{i}.norm1 / norm2.{weight,bias}       LayerNorm eps 1e-6\n"
        "  blocks.{i}.attn.qkv.weight [3D,D]            rows: query, key, value\n"
        "  blocks.{i}.attn.q_bias, v_bias [D]           key bias is zero\n"
        "  blocks.{i}.attn.proj.{weight,bias}\n"
        "  blocks.{i}.mlp.fc1 / fc2.{weight,bias}       exact GELU between them\n"
        "  norm.{weight,bias}                           final LayerNorm eps 1e-6\n"
        "  The fixed 1-D sin-cos position table is added after patch_embed and not stored.\n\n"
        "key layout 'timm': timm VisionTransformer/Block names: attn.qkv.bias [3D] = (q_bias, 0, v_bias) "
        "replaces q_bias/v_bias, and pos_embed [1,N,D] holds the fixed table (no class token).",
        epilog="example:\n  adamae-convert export-encoder exported/try exported/try-encoder --key-layout timm",
    )
    encoder.add_argument("src", metavar="SRC", help="a folder written by 'consolidate' or 'import'")
    encoder.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    encoder.add_argument(
        "--key-layout", choices=("adamae", "timm"), default="adamae", help="tensor names (default adamae; see above)"
    )
    _add_output_options(encoder, None, "dtype of the written weights (default: as in SRC)")

    importer = commands.add_parser(
        "import",
        formatter_class=formatter,
        help="reference AdaMAE / VideoMAE checkpoint-*.pth -> this project's weights",
        description="Import a pre-training checkpoint of the reference AdaMAE release or of VideoMAE "
        "(checkpoint-*.pth with the weights under 'model' or 'module') into a folder this project loads "
        "(format 'adamae-full'). Loading uses weights_only=True; the only class allowed besides tensors "
        "and containers is argparse.Namespace (the checkpoint's 'args'). Every key is used or explained "
        "(the report is printed and kept in config.json as import_report); anything else is refused.\n\n"
        "Renamed: encoder.pos_embed_probs -> sampler.pos_embed_probs, encoder.get_token_probs.0.* -> "
        "sampler.block.*, encoder.get_token_probs.1.* -> sampler.head.*; all other keys keep their names. "
        "A VideoMAE checkpoint (no sampler) imports with tube masking unless --masking says otherwise; "
        "--masking adaptive adds a freshly initialised sampler (seeded by --seed).",
        epilog="examples:\n  adamae-convert import checkpoint-799.pth imported/adamae-b\n"
        "  adamae-convert import videomae-k400.pth imported/videomae-b --model vit_base --num-frames 16 --img-size 224",
    )
    importer.add_argument("src", metavar="SRC.pth", help="the reference checkpoint file")
    importer.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    _add_architecture_options(importer, for_import=True)
    importer.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised sampler (default 0)")
    _add_output_options(importer, "fp32", "dtype of the written weights (default fp32)")

    to_hf = commands.add_parser(
        "to-hf",
        formatter_class=formatter,
        help="encoder + decoder as a Hugging Face transformers VideoMAEForPreTraining folder",
        description="Export encoder and decoder as a folder that transformers' "
        "VideoMAEForPreTraining.from_pretrained(OUT_DIR) loads (config.json + model.safetensors). "
        "HF takes pixel_values [B, T, C, H, W] and bool_masked_pos [B, N] (True = masked); the token sampler "
        "is not exported. Needs the transformers package (pip install 'adamae_scale[hf]').",
        epilog="example:\n  adamae-convert to-hf exported/try exported/try-hf",
    )
    to_hf.add_argument("src", metavar="SRC", help="a folder written by 'consolidate' or 'import'")
    to_hf.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    to_hf.add_argument(
        "--no-norm-pix-loss",
        dest="norm_pix_loss",
        action="store_false",
        help="set norm_pix_loss=False in the HF config (HF's loss then targets raw pixels)",
    )
    _add_output_options(to_hf, "fp32", "dtype of the written weights (default fp32)")
    return parser


def _img_size(values: Sequence[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) > 2:
        raise _UsageError(f"--img-size takes one value or HEIGHT WIDTH, got {len(values)} values")
    return (values[0], values[-1])


def _count(config_path: Path) -> str:
    from ..base.weights import SafetensorsReader

    with SafetensorsReader(config_path.parent / "model.safetensors") as reader:
        tensors = [reader.lazy(name) for name in reader.keys()]
    numel = sum(math.prod(t.shape) for t in tensors)
    return f"{len(tensors)} tensors, {numel / 1e6:.2f}M values"


def run(args: argparse.Namespace) -> str:
    """Carry out one parsed command; returns the summary line to print."""
    import torch

    from .folder import DTYPES

    dtype = DTYPES[args.dtype] if args.dtype else None
    out = Path(args.out_dir)
    if args.command == "consolidate":
        from .consolidate import consolidate

        overrides = {
            "num_heads": args.num_heads,
            "decoder_num_heads": args.decoder_num_heads,
            "num_frames": args.num_frames,
            "img_size": _img_size(args.img_size),
            "tubelet_size": args.tubelet_size,
            "patch_size": args.patch_size,
            "masking": args.masking,
            "mask_ratio": args.mask_ratio,
        }
        config = consolidate(
            args.ckpt_dir,
            out,
            tag=args.tag,
            dtype=dtype or torch.float32,
            model=args.model,
            overrides=overrides,
            overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite,
            ema=args.ema,
        )
        source = config["source"]
        return (
            f"wrote {out} ({_count(out / 'config.json')}, {config['dtype']}): {config['description']}; from ZeRO-"
            f"{source['zero_stage']} checkpoint {source['tag']} (world size {source['world_size']}, step "
            f"{source['global_steps']})"
        )
    if args.command == "export-encoder":
        from .encoder import export_encoder

        config = export_encoder(args.src, out, key_layout=args.key_layout, dtype=dtype, overwrite=args.overwrite)
        count = _count(out / "config.json")
        return f"wrote {out} ({count}, {config['dtype']}): encoder only, key layout {args.key_layout}"
    if args.command == "import":
        from .reference import import_reference

        config, report = import_reference(
            args.src,
            out,
            dtype=dtype or torch.float32,
            overwrite=args.overwrite,
            seed=args.seed,
            model=args.model,
            num_heads=args.num_heads,
            decoder_num_heads=args.decoder_num_heads,
            num_frames=args.num_frames,
            img_size=_img_size(args.img_size),
            tubelet_size=args.tubelet_size,
            patch_size=args.patch_size,
            masking=args.masking,
            mask_ratio=args.mask_ratio,
        )
        return f"wrote {out}: {config['description']}; {report.source_kind} checkpoint: {report.summary()}"
    if args.command == "to-hf":
        from .hf import export_hf

        hf_config = export_hf(
            args.src, out, norm_pix_loss=args.norm_pix_loss, dtype=dtype or torch.float32, overwrite=args.overwrite
        )
        return f"wrote {out} ({_count(out / 'config.json')}): transformers {hf_config['architectures'][0]}"
    raise _UsageError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        print(run(args))
    except SystemExit as exit_:  # --help, and argparse's own exits
        return int(exit_.code or 0)
    except ConvertError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's fault, not the user's: a full disk, a permission
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
