"""The text tower: a causal Transformer read out at the end-of-text token.

Parameter names follow OpenAI's CLIP, where they sit at the top level of the model
(``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``); here they sit under ``text.``.

Padding is free: with the causal mask nothing after the end-of-text token reaches it, so the
batch is cut to its longest real sequence (latest end-of-text position + 1) before the
Transformer.  Typical captions are ~15 of 77 tokens, so this does about a fifth of the work
for the same output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clipforge.model.config import TextConfig
from clipforge.model.transformer import Transformer

__all__ = ["TextTransformer"]


class TextTransformer(nn.Module):
    """Token ids [B, L] -> features [B, output_dim] at each sequence's end-of-text token.

    The end-of-text token is found as the largest id of each row (as OpenAI does: its id is
    the largest in the vocabulary), so padding must use smaller ids (OpenAI pads with 0).
    """

    def __init__(self, config: TextConfig, output_dim: int) -> None:
        super().__init__()
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer.from_config(config)
        self.ln_final = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI's initialisation (``CLIP.initialize_parameters``); the blocks init themselves."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"expected token ids of shape [B, L], got {list(tokens.shape)}")
        eot = tokens.argmax(dim=-1)  # [B] position of each end-of-text token
        length = int(eot.max()) + 1 if tokens.shape[0] else 1
        if length > self.context_length:
            raise ValueError(
                f"an end-of-text token sits at position {length - 1}, beyond the model's "
                f"context_length={self.context_length} (tokens of shape {list(tokens.shape)})"
            )
        tokens = tokens[:, :length]  # [B, length]: what follows every eot cannot reach it
        x = self.token_embedding(tokens)  # [B, length, width]
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer.forward_pooled(x, eot, causal=True)  # [B, width]
        x = self.ln_final(x)
        return x @ self.text_projection  # [B, output_dim]
