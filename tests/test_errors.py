"""InputError crosses process boundaries (Ray tasks pickle it) with its source and reason."""

import pickle

from resdsn_ray.errors import InputError


def test_input_error_survives_pickling():
    err = pickle.loads(pickle.dumps(InputError("s3://b/case.nii.gz", "not a NIfTI file")))
    assert isinstance(err, InputError)
    assert (err.source, err.reason, str(err)) == ("s3://b/case.nii.gz", "not a NIfTI file", "s3://b/case.nii.gz: not a NIfTI file")
