"""Typed config sections: every key's type, default and help in one place (``gain info config``)."""

from gain_cli.schemas.run import (
                                  GROUPS,
                                  DomainsConfig,
                                  EvalConfig,
                                  HarnessConfig,
                                  LauncherConfig,
                                  ModelConfig,
                                  PretrainConfig,
                                  RunConfig,
                                  TrainConfig,
)
from gain_cli.schemas.typed import Section, section, setting

__all__ = ["GROUPS", "DomainsConfig", "EvalConfig", "HarnessConfig", "LauncherConfig", "ModelConfig",
           "PretrainConfig", "RunConfig", "Section", "TrainConfig", "section", "setting"]
