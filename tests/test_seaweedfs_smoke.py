"""The S3 fixture itself: signed requests work, unsigned ones are refused, fsspec sees the bucket."""

import pytest

from data_shards import storage

pytestmark = pytest.mark.integration


def test_put_get_range_and_auth(seaweedfs, s3_bucket):
    url = f"{s3_bucket}/dir/blob.bin"
    storage.write_atomic(url, bytes(range(256)) * 4)
    assert storage.read_bytes(url, 10, 20) == bytes(range(10, 20))
    assert storage.exists(url)

    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    anonymous = boto3.client("s3", endpoint_url=seaweedfs.endpoint, config=Config(signature_version=UNSIGNED),
                             region_name="us-east-1")
    with pytest.raises(Exception, match="AccessDenied|403"):
        anonymous.get_object(Bucket=s3_bucket[5:], Key="dir/blob.bin")
