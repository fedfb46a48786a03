"""Archives in S3-compatible object storage: ``s3://BUCKET/KEY`` wherever an archive is.

* :mod:`nbdvma.s3.location`: ``s3://`` URLs (no third-party import: the command line
  uses it to tell an S3 archive from a file).
* :mod:`nbdvma.s3.client`: the botocore client made as AWS tools make it (endpoint,
  credentials, region from the environment and the shared files), one-line errors.
* :mod:`nbdvma.s3.sink`: the writer's sink that streams an archive into one multipart
  upload.
* :mod:`nbdvma.s3.source`: an object read back: its header by small ranged GETs, or all
  of it by one streaming GET, for the archive readers.
* :mod:`nbdvma.s3.archive`: an indexed object for ``export`` and ``restore``: read by
  ranged GETs through a bounded cache.

boto3 is imported by :mod:`nbdvma.s3.client` only, so that file archives and
``nbdvma --help`` never pay for it.
"""
