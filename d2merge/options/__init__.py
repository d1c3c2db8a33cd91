"""Every command's settings: one frozen option model per command, the source of the CLI's flags.

``base`` holds the one option-model base (:class:`OptionModel`, :func:`option`): a field's help,
choices, range, flag and the options it applies only with, checked in one place. One module per
command family: ``merge`` (``MergeOptions``, ``MergeRunOptions``), ``verify``, ``many``,
``adapter_ops`` (combine, convert, extract), ``onnx`` (export-onnx), ``push``, ``bench``. Torch-free: the
command line builds its flags and refuses bad values before any heavy import.
"""

from __future__ import annotations

from d2merge.options.adapter_ops import CombineOptions, ConvertOptions, ExtractOptions
from d2merge.options.base import OptionError, OptionModel, option, when
from d2merge.options.bench import BenchOptions
from d2merge.options.many import ManyOptions
from d2merge.options.merge import MergeOptions, MergeRunOptions
from d2merge.options.onnx import OnnxExportOptions
from d2merge.options.push import PushOptions
from d2merge.options.verify import ThresholdOptions, VerifyOptions

__all__ = ["BenchOptions", "CombineOptions", "ConvertOptions", "ExtractOptions", "ManyOptions", "MergeOptions",
           "MergeRunOptions", "OnnxExportOptions", "OptionError", "OptionModel", "PushOptions", "ThresholdOptions",
           "VerifyOptions", "option", "when"]
