"""ImageReward's network from its published definition (BLIP's models/vit.py and models/med.py, ImageReward.py),
reduced to the inference path ImageReward uses: a timm-style ViT (pre-LN blocks, fused qkv, eps 1e-6, final norm)
and BERT layers with self-attention, cross-attention to the image tokens, and a GELU MLP (post-LN, eps 1e-12),
then the MLP head on the [CLS] feature. Written independently of transformers' BLIP classes."""

import math

import torch
from torch import nn


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, dim * 3)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, dim * 4)
        self.mlp.fc2 = nn.Linear(dim * 4, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, dim, depth, heads):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img_size // patch_size) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x, context, mask):
        B, N, C = x.shape

        def split(t):
            return t.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // self.heads) + mask
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)


class BertAttention(nn.Module):
    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, kv_width)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, context, mask):
        return self.output.LayerNorm(self.output.dense(self.self(x, context, mask)) + x)


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, encoder_width):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden)
        self.crossattention = BertAttention(hidden, heads, encoder_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, self_mask, image, image_mask):
        x = self.attention(x, x, self_mask)
        x = self.crossattention(x, image, image_mask)
        return self.output.LayerNorm(self.output.dense(nn.functional.gelu(self.intermediate.dense(x))) + x)


class BertModel(nn.Module):
    def __init__(self, vocab, hidden, layers, heads, intermediate, encoder_width, max_positions=512):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, hidden)
        self.embeddings.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            [BertLayer(hidden, heads, intermediate, encoder_width) for _ in range(layers)]
        )

    def forward(self, ids, attention_mask, image):
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1])))
        self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        image_mask = torch.zeros(1, 1, 1, image.shape[1])
        for layer in self.encoder.layer:
            x = layer(x, self_mask, image, image_mask)
        return x


class ImageRewardReference(nn.Module):
    """blip.visual_encoder, blip.text_encoder and mlp, named as in ImageReward.pt."""

    def __init__(self, vision, text, mean, std):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder, self.blip.text_encoder = vision, text
        hidden = text.embeddings.word_embeddings.embedding_dim
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(hidden, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.mean, self.std = mean, std

    def score(self, ids, attention_mask, pixels):
        image = self.blip.visual_encoder(pixels)
        cls = self.blip.text_encoder(ids, attention_mask, image)[:, 0, :]
        return ((self.mlp.layers(cls) - self.mean) / self.std).squeeze(-1)
