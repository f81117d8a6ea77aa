"""A tiny BERT built from a config and a learnable token dataset, shared by tests and scripts."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_bert(seed: int = 0, vocab: int = VOCAB) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0, vocab: int = 300, tied: bool = False) -> LlamaForCausalLM:
    """A causal LM whose input embedding and output layer are its largest tensors (vocab x 32)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


class CausalTokens(torch.utils.data.Dataset):
    """Random token rows for a causal LM (the labels are the inputs)."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 300, seed: int = 0):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class TokenDataset(torch.utils.data.Dataset):
    """Label 1 iff token 7 occurs: learnable in a few dozen steps."""

    def __init__(self, n: int = 64, length: int = 12, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, VOCAB, (n, length), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        self.ids[self.labels == 1, 3] = 7

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}
