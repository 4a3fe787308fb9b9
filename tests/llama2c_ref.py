"""An independent numpy transcription of llama2.c's ``run.c`` forward pass over the legacy v0 ``.bin`` layout.

It reads the file itself (not through llamactl's converter) and computes one token at a time with its own KV cache,
the way run.c does, so that tests can compare llamactl's greedy decoding with llama2.c's published behaviour.
"""

from __future__ import annotations

import struct

import numpy as np


class Llama2cRef:
    def __init__(self, path: str):
        with open(path, "rb") as f:
            dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", f.read(28))
            data = np.frombuffer(f.read(), dtype=np.float32)
        shared = vocab > 0
        vocab = abs(vocab)
        self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv = dim, hidden, n_layers, n_heads, n_kv
        self.vocab, self.seq, self.hs = vocab, seq, dim // n_heads
        kv_dim = n_kv * self.hs
        off = 0

        def take(*shape):
            nonlocal off
            n = int(np.prod(shape))
            out = data[off : off + n].reshape(shape)
            off += n
            return out

        self.tok = take(vocab, dim)
        self.rms_att = take(n_layers, dim)
        self.wq = take(n_layers, dim, dim)
        self.wk = take(n_layers, kv_dim, dim)
        self.wv = take(n_layers, kv_dim, dim)
        self.wo = take(n_layers, dim, dim)
        self.rms_ffn = take(n_layers, dim)
        self.w1 = take(n_layers, hidden, dim)
        self.w2 = take(n_layers, dim, hidden)
        self.w3 = take(n_layers, hidden, dim)
        self.rms_final = take(dim)
        take(seq, self.hs // 2)
        take(seq, self.hs // 2)
        self.wcls = self.tok if shared else take(vocab, dim)
        assert off == data.size
        self.key_cache = np.zeros((n_layers, seq, kv_dim), np.float32)
        self.value_cache = np.zeros((n_layers, seq, kv_dim), np.float32)

    @staticmethod
    def rmsnorm(x, w):
        return w * (x / np.sqrt(np.mean(x * x) + 1e-5))

    def rope(self, vec, pos):
        # run.c: rotate each (even, odd) pair i by pos / 10000^((i % head_size) / head_size)
        out = vec.copy()
        for i in range(0, vec.size, 2):
            freq = 1.0 / 10000.0 ** ((i % self.hs) / self.hs)
            c, s = np.cos(pos * freq), np.sin(pos * freq)
            out[i] = vec[i] * c - vec[i + 1] * s
            out[i + 1] = vec[i] * s + vec[i + 1] * c
        return out

    def forward(self, token: int, pos: int) -> np.ndarray:
        x = self.tok[token].astype(np.float64)
        kv_mul = self.n_heads // self.n_kv
        for layer in range(self.n_layers):
            xb = self.rmsnorm(x, self.rms_att[layer])
            q = self.rope(self.wq[layer] @ xb, pos)
            self.key_cache[layer, pos] = self.rope(self.wk[layer] @ xb, pos)
            self.value_cache[layer, pos] = self.wv[layer] @ xb
            att_out = np.zeros(self.dim)
            for h in range(self.n_heads):
                qh = q[h * self.hs : (h + 1) * self.hs]
                kvh = (h // kv_mul) * self.hs
                keys = self.key_cache[layer, : pos + 1, kvh : kvh + self.hs]
                scores = keys @ qh / np.sqrt(self.hs)
                scores = np.exp(scores - scores.max())
                scores /= scores.sum()
                att_out[h * self.hs : (h + 1) * self.hs] = (
                    scores @ self.value_cache[layer, : pos + 1, kvh : kvh + self.hs]
                )
            x = x + self.wo[layer] @ att_out
            xb = self.rmsnorm(x, self.rms_ffn[layer])
            h1, h3 = self.w1[layer] @ xb, self.w3[layer] @ xb
            x = x + self.w2[layer] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        return self.wcls @ self.rmsnorm(x, self.rms_final)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """run.c's generate loop at temperature 0: feed the prompt, then ``steps`` argmax tokens."""
        tokens = list(prompt)
        for pos in range(len(prompt) + steps - 1):
            logits = self.forward(tokens[pos], pos)
            if pos >= len(prompt) - 1:
                tokens.append(int(np.argmax(logits)))
        return tokens
