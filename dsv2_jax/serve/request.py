"""A generation request as the scheduler sees it: sampling knobs, tokens so far, pages held, progress."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0               # 0 = off
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (EOS)


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(init=False)      # prompt + generated
    num_cached: int = 0                        # tokens whose latents are in the cache
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # digests of the full pages computed so far
    num_registered: int = 0                    # leading pages already offered to the prefix cache
    slot: int = -1                             # its row of the scheduler's block tables while it holds pages
    finish_reason: str | None = None           # "stop" | "length" | "abort"
    first_token_time: float | None = None
    preemptions: int = 0

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
