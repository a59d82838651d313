"""Chinese-CLIP's text tower: BERT (Devlin et al., 2019) as transformers' ``ChineseCLIPModel`` reads it.

    model = CLIP(get_config("CN-CLIP-ViT-B-16"))  # picks this tower: config.text.pool == "cls"
    features = model.encode_text(tokens)          # tokens padded with the pad id ([PAD] = 0)

The embeddings are BERT's: word + position + token type (row 0, the one segment a caption has),
then a LayerNorm.  The blocks are post-LayerNorm, x = ln_1(x + attn(x)) then x = ln_2(x + mlp(x)),
with exact GELU.  The features are the last block's output at the first token ([CLS]) times the
projection (no bias, and no BERT pooler: ``ChineseCLIPModel.get_text_features`` reads
``last_hidden_state[:, 0]``).  Chinese-CLIP's image tower is CLIP's ViT (`clipforge.model.vision`).

Padding: every token id equal to ``pad_token_id`` is masked out of attention as a key, which is what
transformers computes with the ``attention_mask`` its tokenizer returns
(``processor(text=..., padding=True)`` then ``get_text_features(**inputs)``).  Called without a
mask, transformers lets [CLS] attend to the padding too, and its features then depend on how far
a caption was padded; clipforge's never do.  Trailing padding is cut before the blocks.

Tensor names, under ``text.``: ``token_embedding``, ``positional_embedding`` [positions, width],
``token_type_embedding`` [types, width], ``ln_embed``, ``transformer.resblocks.N`` (``attn``,
``ln_1``, ``mlp``, ``ln_2``: the shared `Transformer`'s names, in post-LayerNorm order) and
``text_projection`` [width, embed_dim].  `clipforge.checkpoints.names` maps them to transformers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipforge.model.config import TextConfig
from clipforge.model.transformer import MLP, Attention

__all__ = ["BertBlock", "BertEncoder", "BertTextTransformer"]

# BERT's initializer_range (transformers' ChineseCLIPTextConfig): normal(0, 0.02) weights.
_INIT_STD = 0.02


class BertBlock(nn.Module):
    """A post-LayerNorm block: x = ln_1(x + attn(x)), then ln_2(x + mlp(x))."""

    def __init__(self, width: int, heads: int, *, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.attn = Attention(width, heads)  # in_proj_weight: rows q, k, v (BERT's query, key, value)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def _attend(self, query: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """Attention of ``query`` [B, Q, D] over the keys and values of ``x`` [B, L, D]; ``mask``
        [B, 1, 1, L] is True where a key may be seen."""
        B, L, D = x.shape
        Q, H = query.shape[1], self.attn.heads
        w_q, w_kv = self.attn.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.attn.in_proj_bias.split([D, 2 * D])
        q = F.linear(query, w_q, b_q).view(B, Q, H, D // H).transpose(1, 2)  # [B, H, Q, D/H]
        k, v = F.linear(x, w_kv, b_kv).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, Q, D/H]
        return self.attn.out_proj(y.transpose(1, 2).reshape(B, Q, D))  # [B, Q, D]

    def forward(self, x: Tensor, mask: Tensor | None, rows: int | None = None) -> Tensor:
        """[B, L, D] -> [B, L, D]; with ``rows``, the output of the first ``rows`` positions only."""
        query = x if rows is None else x[:, :rows]
        y = self.ln_1(query + self._attend(query, x, mask))
        return self.ln_2(y + self.mlp(y))


class BertEncoder(nn.Module):
    """BERT's stack of post-LayerNorm blocks (``resblocks``), read at the first position."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.width = config.width
        self.resblocks = nn.ModuleList(
            BertBlock(config.width, config.heads, mlp_width=config.mlp_width, act=config.act,
                      eps=config.layer_norm_eps)
            for _ in range(config.layers)
        )
        self.grad_checkpointing = False

    def forward_first(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The output at position 0 of each sequence: [B, L, D] -> [B, D]; the last block computes that row only."""
        *blocks, last = self.resblocks
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return last(x, mask, rows=1)[:, 0]  # [B, D]


class BertTextTransformer(nn.Module):
    """Token ids [B, L] -> features [B, output_dim] at the first ([CLS]) token, padding masked."""

    def __init__(self, config: TextConfig, output_dim: int) -> None:
        super().__init__()
        if config.pool != "cls":
            raise ValueError(f"BertTextTransformer needs a text config with pool='cls', got {config.pool!r}")
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.pad_token_id = config.pad_token_id
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.token_type_embedding = nn.Parameter(torch.empty(config.token_types, width))
        self.ln_embed = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = BertEncoder(config)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT's initialisation (normal(0.02) weights, zero biases, the pad row zero) and
        ChineseCLIPModel's for the projection (normal(width^-0.5))."""
        for weight in (self.token_embedding.weight, self.positional_embedding, self.token_type_embedding):
            nn.init.normal_(weight, std=_INIT_STD)
        self.token_embedding.weight[self.pad_token_id].zero_()
        for block in self.transformer.resblocks:
            for linear in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                nn.init.normal_(linear.weight, std=_INIT_STD)
                nn.init.zeros_(linear.bias)
            nn.init.normal_(block.attn.in_proj_weight, std=_INIT_STD)
            nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"expected token ids of shape [B, L], got {list(tokens.shape)}")
        keep = tokens != self.pad_token_id  # [B, L]: the keys attention may see
        keep[:, 0] = True  # [CLS]: a row of padding alone still has one key
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        length = int((keep * positions).amax()) + 1 if tokens.shape[0] else 1
        if length > self.context_length:
            raise ValueError(f"token ids of length {length} (padding aside) exceed the model's context_length="
                             f"{self.context_length} (tokens of shape {list(tokens.shape)})")
        tokens, keep = tokens[:, :length], keep[:, :length]  # [B, length]: trailing padding cut
        x = self.token_embedding(tokens)  # [B, length, width]
        x = x + self.token_type_embedding[0].to(x.dtype)  # transformers' order of the sums
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.ln_embed(x)
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # [B, 1, 1, length]
        x = self.transformer.forward_first(x, mask)  # [B, width]
        return x @ self.text_projection  # [B, output_dim]
