"""Builds the configured sources (or the demo ones) from the config."""

from __future__ import annotations

import os

from tokentop.collectors.base import Clock, Collector, utcnow
from tokentop.collectors.config import Config, ProviderConfig
from tokentop.pricing.gpu import GpuCostModel


def provider_enabled(provider: ProviderConfig) -> bool:
    """Explicitly enabled, or not disabled and its key variable is set."""
    if provider.enabled is not None:
        return provider.enabled
    return bool(os.environ.get(provider.key_env))


AUTO_NVML = "gpu"
"""Name of the NVML source when it is tried on the off chance (``nvml`` not set in the config)."""


def optional_sources(config: Config, demo: bool = False) -> frozenset[str]:
    """Sources that are only tried: their being unavailable (no NVIDIA driver) is not a failure."""
    return frozenset() if demo or config.nvml is not None else frozenset({AUTO_NVML})


def build_sources(
    config: Config,
    *,
    demo: bool = False,
    interval_s: float | None = None,
    clock: Clock = utcnow,
) -> list[Collector]:
    """The collectors to run.

    Args:
        config: the loaded configuration.
        demo: simulated traffic and GPU instead of the configured sources.
        interval_s: overrides the polling interval of the GPU, inference and demo sources
            (provider APIs keep theirs: they ask for no more than one poll a minute).
        clock: injected time source.
    """
    costs = GpuCostModel(config.gpu_rates)
    if demo:
        from tokentop.collectors.demo import DemoCollector, DemoGpuCollector
        from tokentop.pricing.book import PriceBook

        every = interval_s or 1.0
        return [
            DemoCollector(interval_s=every, clock=clock, book=PriceBook(config.pricing)),
            DemoGpuCollector(costs, interval_s=every, clock=clock),
        ]
    sources: list[Collector] = []
    if provider_enabled(config.openai):
        from tokentop.collectors.openai import OpenAICollector

        sources.append(OpenAICollector(config.openai, clock=clock))
    if provider_enabled(config.anthropic):
        from tokentop.collectors.anthropic import AnthropicCollector

        sources.append(AnthropicCollector(config.anthropic, clock=clock))
    gpu_every = interval_s or config.gpu_interval_s
    if config.nvml is not False:
        from tokentop.collectors.nvml import NvmlCollector

        sources.append(
            NvmlCollector(rates=costs, interval_s=gpu_every, clock=clock, name=AUTO_NVML)
        )
    for i, endpoint in enumerate(config.inference):
        from tokentop.collectors.prometheus import InferenceCollector

        sources.append(
            InferenceCollector(
                endpoint,
                interval_s=gpu_every,
                clock=clock,
                name=endpoint.name
                or (f"inference-{i}" if len(config.inference) > 1 else "inference"),
                gpu_devices=tuple(str(g) for g in endpoint.gpus),
            )
        )
    return sources
