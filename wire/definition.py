"""pymia's keys and HDF5 locations, with the same names and string values as ``pymia.data.definition``: the one
home of these names for the server (which reads and writes the format) and the client (which re-exports them as
``patchwire.client.definition``, where a pymia user looks for them)."""

__all__ = [
    "KEY_CATEGORIES",
    "KEY_FILE_ROOT",
    "KEY_IMAGES",
    "KEY_INDEX_EXPR",
    "KEY_LABELS",
    "KEY_PLACEHOLDER_FILES",
    "KEY_PLACEHOLDER_NAMES",
    "KEY_PLACEHOLDER_NAMES_SELECTED",
    "KEY_PLACEHOLDER_PROPERTIES",
    "KEY_PROPERTIES",
    "KEY_SAMPLE_INDEX",
    "KEY_SHAPE",
    "KEY_SUBJECT",
    "KEY_SUBJECT_FILES",
    "KEY_SUBJECT_INDEX",
    "LOC_DATA_PLACEHOLDER",
    "LOC_FILES_PLACEHOLDER",
    "LOC_FILES_ROOT",
    "LOC_IMGPROP_DIRECTION",
    "LOC_IMGPROP_ORIGIN",
    "LOC_IMGPROP_SHAPE",
    "LOC_IMGPROP_SPACING",
    "LOC_NAMES_PLACEHOLDER",
    "LOC_SHAPE_PLACEHOLDER",
    "LOC_SUBJECT",
    "subject_index_to_str",
]

KEY_SUBJECT_FILES = "subject_files"
KEY_CATEGORIES = "categories"
KEY_PLACEHOLDER_NAMES = "{}_names"
KEY_PLACEHOLDER_NAMES_SELECTED = "{}_names_selected"
KEY_PLACEHOLDER_PROPERTIES = "{}_properties"
KEY_PLACEHOLDER_FILES = "{}_files"
KEY_FILE_ROOT = "file_root"
KEY_IMAGES = "images"
KEY_LABELS = "labels"
KEY_PROPERTIES = "properties"
KEY_SHAPE = "shape"
KEY_SUBJECT = "subject"
KEY_SUBJECT_INDEX = "subject_index"
KEY_INDEX_EXPR = "index_expr"
KEY_SAMPLE_INDEX = "sample_index"

LOC_DATA_PLACEHOLDER = "data/{}"
LOC_SUBJECT = "meta/subjects"
LOC_NAMES_PLACEHOLDER = "meta/names/{}_names"
LOC_SHAPE_PLACEHOLDER = "meta/shapes/{}_shapes"
LOC_FILES_ROOT = "meta/files/file_root"
LOC_FILES_PLACEHOLDER = "meta/files/{}_files"
LOC_IMGPROP_SHAPE = "meta/image_props/shapes"
LOC_IMGPROP_ORIGIN = "meta/image_props/origins"
LOC_IMGPROP_DIRECTION = "meta/image_props/directions"
LOC_IMGPROP_SPACING = "meta/image_props/spacing"


def subject_index_to_str(subject_index: int, nb_subjects: int) -> str:
    """Name of a subject's entry in the file: the index zero-padded to the width of ``nb_subjects``."""
    return f"{subject_index:0{len(str(nb_subjects))}d}"
