"""Export a llama2.c checkpoint (legacy `.bin` + `tokenizer.bin`) as a Hugging Face Llama folder.

The llama2.c "legacy" export is a header of seven int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len) followed by float32 blobs; a positive vocab_size means the
classifier shares the token embedding. Two things differ from a Hugging Face `LlamaForCausalLM`:

- RoPE pairing: llama2.c rotates interleaved pairs (0,1),(2,3)..., Hugging Face rotates halves
  (i, i + d_h/2). The rows of wq and wk are permuted per head so both compute the same thing.
- The tokenizer: llama2.c stores sentencepiece pieces and scores (word marker written as a space)
  and encodes with greedy highest-score pair merges. We rebuild it as a `tokenizers` BPE with
  byte fallback whose merges are ranked by the merged piece's score, like transformers'
  SentencePiece converters do, and also write the same pieces and scores as a sentencepiece
  `tokenizer.model` (BPE, byte fallback, run.c's normalisation) for clients that read that file,
  such as llama.cpp's `convert_hf_to_gguf.py`.

The output loads with plain `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
Weights are written as safetensors; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import CheckpointError, OutputError

SPM_SPACE = "▁"  # sentencepiece's word marker; llama2.c writes it as a plain space
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
N_BYTE_TOKENS = 256  # ids 3..258 are <0x00>..<0xFF>


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven int32 at the start of a llama2.c legacy checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # positive: classifier tied to the embedding
    seq_len: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tied(self) -> bool:
        return self.vocab_size > 0

    @property
    def vocab(self) -> int:
        return abs(self.vocab_size)


def read_header(data: bytes, path: Path) -> Llama2cHeader:
    """Parse and sanity-check the header; a bad one is a CheckpointError naming the file."""
    if len(data) < 28:
        raise CheckpointError(f"{path} is {len(data)} bytes, too short for a llama2.c header (28 bytes)")
    h = Llama2cHeader(*struct.unpack_from("<7i", data, 0))
    ok = (
        min(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.seq_len) > 0
        and h.vocab != 0
        and h.dim % h.n_heads == 0
        and h.n_heads % h.n_kv_heads == 0
        and h.head_dim % 2 == 0
    )
    if not ok:
        raise CheckpointError(
            f"{path} does not start with a valid llama2.c legacy header (got {asdict(h)}); "
            "expected a float32 export from llama2.c's export.py --version 0"
        )
    return h


def read_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Read the header and every weight blob, named as in llama2.c's run.c (float32, copies)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    h = read_header(data, path)
    L, d, hd, kv = h.n_layers, h.dim, h.hidden_dim, h.n_kv_heads * h.head_dim
    layout = [  # (name, shape) in file order
        ("token_embedding", (h.vocab, d)),
        ("rms_att", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
        ("rms_ffn", (L, d)),
        ("w1", (L, hd, d)),
        ("w2", (L, d, hd)),
        ("w3", (L, hd, d)),
        ("rms_final", (d,)),
        ("freq_cis_real", (h.seq_len, h.head_dim // 2)),  # RoPE tables: read past, not used
        ("freq_cis_imag", (h.seq_len, h.head_dim // 2)),
    ]
    if not h.tied:
        layout.append(("wcls", (h.vocab, d)))
    need = 28 + 4 * sum(int(np.prod(s)) for _, s in layout)
    if len(data) < need:
        raise CheckpointError(f"{path} is truncated: {len(data)} bytes, the header implies {need}")
    weights, offset = {}, 28
    for name, shape in layout:
        n = int(np.prod(shape))
        weights[name] = np.frombuffer(data, dtype="<f4", count=n, offset=offset).reshape(shape).copy()
        offset += 4 * n
    return h, weights


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows per head from interleaved RoPE pairs to Hugging Face's rotate-half halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_state_dict(h: Llama2cHeader, w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map llama2.c weights to `LlamaForCausalLM` names (the tied lm_head is left out, as HF saves it)."""
    sd = {"model.embed_tokens.weight": w["token_embedding"], "model.norm.weight": w["rms_final"]}
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = permute_rope(w["wq"][i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_rope(w["wk"][i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    if not h.tied:
        sd["lm_head.weight"] = w["wcls"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def hf_config(h: Llama2cHeader):
    """The `LlamaConfig` equivalent of a llama2.c header (llama2.c's fixed eps, theta and ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=h.vocab,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_dim,
        max_position_embeddings=h.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=h.tied,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


# --- tokenizer ------------------------------------------------------------------------------


def read_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, float]]:
    """(piece, score) per id from llama2.c's tokenizer.bin, pieces in sentencepiece spelling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"llama2.c tokenizer not found: {path}")
    data = path.read_bytes()
    pieces, offset = [], 4  # skip max_token_length
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", data, offset)
            raw = data[offset + 8 : offset + 8 + n]
            if len(raw) != n:
                raise struct.error("short piece")
            offset += 8 + n
            pieces.append((raw.decode("utf-8"), float(score)))
    except (struct.error, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not a llama2.c tokenizer with {vocab_size} pieces ({err}); "
            "expected the tokenizer.bin exported with the model"
        ) from None
    # llama2.c's export writes BOS/EOS as "\n<s>\n" / "\n</s>\n" and the word marker as a space.
    special = {0: UNK, 1: BOS, 2: EOS}
    return [(special.get(i, p.replace(" ", SPM_SPACE)), s) for i, (p, s) in enumerate(pieces)]


def bpe_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best merged score first.

    This reproduces run.c's rule (merge the adjacent pair whose merged piece scores highest), as
    transformers' SentencePiece converters rank merges by piece score then id.
    """
    first = 3 + N_BYTE_TOKENS
    normal = {p: (s, i) for i, (p, s) in enumerate(pieces) if i >= first}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_tokenizer(pieces: list[tuple[str, float]]):
    """A `tokenizers.Tokenizer` that encodes like llama2.c's run.c and decodes like sentencepiece."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise CheckpointError("the llama2.c tokenizer has duplicate pieces; cannot build a BPE vocabulary")
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # run.c: prepend a space (the dummy prefix) to non-empty text, spaces are word markers.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPM_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    return tok


def save_tokenizer(pieces: list[tuple[str, float]], folder: Path, max_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json that AutoTokenizer loads as a fast Llama tokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(pieces),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(folder)
    # Name the class both transformers 4 and 5 know (5 would write its new "TokenizersBackend"),
    # and state the BOS convention explicitly; tokenizer.json's post-processor adds BOS too.
    # Not LlamaTokenizerFast: transformers 5 rebuilds that one with a Metaspace pre-tokenizer,
    # which skips the dummy prefix on text that starts with a space, unlike run.c.
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# --- sentencepiece tokenizer.model ----------------------------------------------------------
#
# A sentencepiece ModelProto (sentencepiece_model.proto, proto2) written with a few lines of
# protobuf wire format, so exporting needs neither `sentencepiece` nor `protobuf`. Field numbers:
# ModelProto{1: pieces, 2: trainer_spec, 3: normalizer_spec}; SentencePiece{1: piece, 2: score,
# 3: type}; TrainerSpec{3: model_type, 4: vocab_size, 7: input_format, 10: character_coverage,
# 25: split_digits, 26: allow_whitespace_only_pieces, 35: byte_fallback, 40-43: unk/bos/eos/pad
# id, 44: unk_surface, 45-47: unk/bos/eos piece}; NormalizerSpec{1: name, 3: add_dummy_prefix,
# 4: remove_extra_whitespaces, 5: escape_whitespaces}.

SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_BYTE = 1, 2, 3, 6  # ModelProto.SentencePiece.Type
SPM_BPE = 2  # TrainerSpec.ModelType
SPM_MODEL_FILE = "tokenizer.model"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:  # varint: int32, bool, enum
    return _varint(field << 3) + _varint(int(value))


def _pb_float(field: int, value: float) -> bytes:  # fixed32
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, value: bytes | str) -> bytes:  # length-delimited: string, message
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def spm_piece_types(pieces: list[tuple[str, float]]) -> list[int]:
    """Sentencepiece piece types: id 0 unknown, 1/2 control (BOS/EOS), 3..258 bytes, rest normal."""
    types = []
    for i, (piece, _) in enumerate(pieces):
        if i == 0:
            types.append(SPM_UNKNOWN)
        elif i < 3:
            types.append(SPM_CONTROL)
        elif i < 3 + N_BYTE_TOKENS:
            if piece != f"<0x{i - 3:02X}>":
                raise CheckpointError(
                    f"tokenizer piece {i} is {piece!r}, expected the byte-fallback piece <0x{i - 3:02X}>; "
                    "cannot write a sentencepiece model with byte fallback"
                )
            types.append(SPM_BYTE)
        elif _BYTE_PIECE.fullmatch(piece):
            raise CheckpointError(f"tokenizer piece {i} is {piece!r}, a byte piece outside ids 3..258")
        else:
            types.append(SPM_NORMAL)
    return types


def spm_model_proto(pieces: list[tuple[str, float]]) -> bytes:
    """The serialized sentencepiece ModelProto that encodes like run.c (see `save_spm_model`)."""
    if len(pieces) < 3 + N_BYTE_TOKENS:
        raise CheckpointError(f"a llama2.c tokenizer of {len(pieces)} pieces has no room for 256 byte pieces")
    body = b"".join(
        _pb_bytes(1, _pb_bytes(1, piece) + _pb_float(2, score) + _pb_int(3, kind))
        for (piece, score), kind in zip(pieces, spm_piece_types(pieces))
    )
    trainer = b"".join(
        [
            _pb_int(3, SPM_BPE),
            _pb_int(4, len(pieces)),
            _pb_bytes(7, "text"),
            # llama2.c's train_vocab settings (they shaped the vocabulary; encoding ignores them)
            _pb_float(10, 1.0),
            _pb_int(25, True),
            _pb_int(26, True),
            _pb_int(35, True),  # byte_fallback: characters outside the vocabulary become <0xNN>
            _pb_int(40, 0),
            _pb_int(41, 1),
            _pb_int(42, 2),
            _pb_int(43, -1),  # no padding piece
            _pb_bytes(44, " \u2047 "),  # unk_surface, sentencepiece's default
            _pb_bytes(45, UNK),
            _pb_bytes(46, BOS),
            _pb_bytes(47, EOS),
        ]
    )
    normalizer = b"".join(
        [
            _pb_bytes(1, "identity"),  # no NFKC: characters are looked up as written, as run.c does
            _pb_int(3, True),  # add_dummy_prefix: run.c prepends a space to non-empty text
            _pb_int(4, False),  # remove_extra_whitespaces off: run.c keeps every space
            _pb_int(5, True),  # escape_whitespaces: a space is the word marker
        ]
    )
    return body + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def save_spm_model(pieces: list[tuple[str, float]], folder: Path) -> Path:
    """Write `tokenizer.model`: the llama2.c pieces and scores as a sentencepiece BPE model.

    Same ids as run.c's encode (and tokenizer.json): sentencepiece's BPE merges the adjacent pair
    whose merged piece scores highest, leftmost first, and falls back to UTF-8 byte pieces for a
    character outside the vocabulary. The normaliser is "identity" with the dummy prefix and no
    whitespace collapsing. (llama2.c trained tok512 with sentencepiece's default
    remove_extra_whitespaces=True, but its run.c, and so the model's training data, never collapsed
    spaces; this file follows run.c.)
    """
    path = Path(folder) / SPM_MODEL_FILE
    path.write_bytes(spm_model_proto(pieces))
    return path


# --- export -----------------------------------------------------------------------------------


def export_llama2c(checkpoint: Path, tokenizer: Path, output: Path, *, overwrite: bool = False) -> Path:
    """Write a llama2.c model + tokenizer as a Hugging Face Llama folder at `output`.

    Args:
        checkpoint: llama2.c legacy float32 `.bin` (e.g. stories260K.bin).
        tokenizer: the matching llama2.c `tokenizer.bin` (e.g. tok512.bin).
        output: folder to create (model.safetensors, config.json, generation_config.json,
            tokenizer.json, tokenizer_config.json, and the sentencepiece tokenizer.model). Written
            beside itself first, renamed when done.
        overwrite: replace an existing `output`.

    Returns:
        `output`.

    Raises:
        CheckpointError: a missing, truncated or malformed checkpoint or tokenizer.
        OutputError: `output` exists (without `overwrite`) or cannot be written.
    """
    from transformers import GenerationConfig

    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; choose a new folder or pass overwrite=True")
    header, weights = read_checkpoint(Path(checkpoint))
    pieces = read_tokenizer(Path(tokenizer), header.vocab)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as err:
        raise OutputError(f"cannot write beside {output}: {err.strerror}; choose a writable folder") from None
    try:
        save_file(hf_state_dict(header, weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config(header).save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        save_tokenizer(pieces, tmp, header.seq_len)
        save_spm_model(pieces, tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


__all__ = [
    "Llama2cHeader",
    "read_checkpoint",
    "permute_rope",
    "hf_state_dict",
    "hf_config",
    "read_tokenizer",
    "bpe_merges",
    "build_tokenizer",
    "spm_model_proto",
    "save_spm_model",
    "export_llama2c",
]
