"""The public surface, pinned: adding or removing a name is a deliberate change to this file."""

from __future__ import annotations

import importlib

import pytest

import patchwire.client as pw
from patchwire.client import definition


def _names(text: str) -> set[str]:
    return set(text.split())


EXPECTED: dict[str, set[str]] = {
    "patchwire.client": _names(
        "ArrayInfo AssemblyEvent AuthenticationError Client ConnectionFailed Credentials DatasetInfo "
        "DeadlineExceeded FailedPreconditionError InvalidArgumentError JobStatus NotFoundError "
        "OutOfRangeError PatchwireError PermissionDeniedError ProtocolError RemoteDatasource "
        "RemoteSubjectAssembler ResourceExhaustedError RetriesExhausted RetryPolicy RpcError ServerError "
        "ServerUnavailable SubjectInfo SubjectProgress SubjectSamples Timeouts connect "
        "LoaderStats LoaderStatsSnapshot EpochOptions"
    ),
    "patchwire.client.assembly": _names(
        "AssemblyEvent JobStatus MemoryTransport RemoteSubjectAssembler SubjectProgress Transport TransportStatistics"
    ),
    "patchwire.client.extraction": _names(
        "ComposeExtractor DataExtractor EmptyIndexing Extractor FilesExtractor ImagePropertiesExtractor "
        "ImagePropertyShapeExtractor IndexExpression IndexingExtractor IndexingStrategy NamesExtractor "
        "PadDataExtractor PatchWiseIndexing RandomDataExtractor RemoteDatasource SelectiveDataExtractor "
        "SliceIndexing SubjectExtractor VoxelWiseIndexing "
        "UniformSampler LabelSampler PositiveNegativeSampler WeightedSampler "
        "ComposeSelection NonBlackSelection NonConstantSelection PercentileSelection SelectionStrategy "
        "SubjectSelection WithForegroundSelection select_indices"
    ),
    "patchwire.client.selection": _names(
        "ComposeSelection NonBlackSelection NonConstantSelection PercentileSelection SelectionStrategy "
        "SubjectSelection WithForegroundSelection select_indices"
    ),
    "patchwire.client.transformation": _names(
        "ClipPercentile ComposeTransform IntensityNormalization IntensityRescale LambdaTransform "
        "LoopEntryTransform Mask Permute Relabel Reshape SizeCorrection Squeeze Transform UnSqueeze"
    ),
    "patchwire.client.augmentation": _names(
        "RandomAffine RandomBiasField RandomCrop RandomElastic RandomElasticDeformation RandomFlip RandomGamma "
        "RandomIntensityScaleShift RandomMirror RandomNoise RandomRotation90 RandomShift RandomTransform"
    ),
    "patchwire.client.torch": _names("PADDED_SHAPES PytorchDatasetAdapter PytorchStreamingDataset collate_batch"),
    "patchwire.client.tensorflow": _names("EpochCounter get_tf_dataset get_tf_generator infer_output_signature"),
    "patchwire.service": _names(
        "DatasetServicer FailedPrecondition InvalidArgument Limits NotFound OutOfRange PatchwireServer "
        "ServerConfig ServiceError"
    ),
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exported_names(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_definition_keys_have_pymia_values() -> None:
    from _pymia_oracle import load_pymia

    pymia_defs = load_pymia().definition
    names = [n for n in dir(pymia_defs) if n.startswith(("KEY_", "LOC_"))]
    assert names and set(names) <= set(definition.__all__)
    for name in names:
        assert getattr(definition, name) == getattr(pymia_defs, name), name
    for n in (1, 3, 11, 100):
        assert [definition.subject_index_to_str(i, n) for i in range(n)] == [
            pymia_defs.subject_index_to_str(i, n) for i in range(n)
        ]


def test_errors_are_also_builtin_errors() -> None:
    assert issubclass(pw.OutOfRangeError, IndexError)
    assert issubclass(pw.InvalidArgumentError, ValueError)
    assert issubclass(pw.NotFoundError, LookupError) and issubclass(pw.NotFoundError, KeyError)
    assert all(issubclass(e, pw.PatchwireError) for e in (pw.ConnectionFailed, pw.RpcError, pw.ServerError))
