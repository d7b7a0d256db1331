"""A local GCS API (gcp-storage-emulator) for the tests, and the environment
that sends every client of the project to it.

`GcsEmulator` serves one in-memory bucket on 127.0.0.1 at a free port, in a
daemon thread. Gaps of the emulator (2026.7.19) against the real API are
filled here, since the project's clients use them:

* `objects.moveTo` (gcsfs renames with it) is missing; without it every
  rename is retried for about half a minute before gcsfs copies instead;
* media downloads carry no `x-goog-generation` header, which tensorstore
  (Orbax's array store) requires of GCS: larger checkpoints fail with
  'Malformed StorageGeneration';
* the `ifGenerationMatch` / `ifMetagenerationMatch` preconditions of
  uploads, metadata updates and deletes are ignored, and a metadata update
  leaves the object's `updated` time as it was (the workdir lock relies on
  both, as on the real API).
"""

import datetime
import functools
from http import HTTPStatus
from http import server as http_server
import sys
from typing import Dict

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator import settings as emulator_settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

from tests import helpers

BUCKET = 'test-bucket'
PROJECT = 'test-project'


def _move(request, response, storage, *unused_args, **unused_kwargs):
  """objects.moveTo: a copy within the bucket, then a delete."""
  params = request.params
  try:
    moved = objects._copy(  # noqa: SLF001 (the emulator's own copy)
      request.base_url,
      storage,
      params['bucket_name'],
      params['object_id'],
      params['bucket_name'],
      params['dest_object_id'],
    )
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  storage.delete_file(params['bucket_name'], params['object_id'])
  response.json(moved)


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  """objects.download, with the generation headers of the real API."""
  try:
    found = storage.get_file_obj(
      request.params['bucket_name'], request.params['object_id']
    )
  except NotFound:
    pass
  else:
    response['x-goog-generation'] = str(found.get('generation', 1))
    response['x-goog-metageneration'] = str(found.get('metageneration', 1))
  return _download(request, response, storage, *args, **kwargs)


def _precondition_failed(request, storage) -> bool:
  """Whether the request's ifGenerationMatch / ifMetagenerationMatch do
  not hold for the object it names (generation 0: no such object)."""
  wanted = {
    field: request.query[name][0]
    for name, field in (
      ('ifGenerationMatch', 'generation'),
      ('ifMetagenerationMatch', 'metageneration'),
    )
    if request.query.get(name)
  }
  if not wanted:
    return False
  object_id = request.params.get('object_id')
  if object_id is None:  # An upload names its object in the query or body.
    meta = (
      request.data.get('meta', {}) if isinstance(request.data, dict) else {}
    )
    object_id = (request.query.get('name') or [meta.get('name', '')])[0]
  try:
    found = storage.get_file_obj(request.params['bucket_name'], object_id)
  except NotFound:
    found = {'generation': '0', 'metageneration': '0'}
  return any(str(found[field]) != value for field, value in wanted.items())


def _with_preconditions(handler, touches: bool = False):
  """`handler`, answering 412 when a precondition fails; with `touches`,
  the object's `updated` time becomes the request's, as a metadata update
  makes it on the real API."""

  def checked(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, storage):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    result = handler(request, response, storage, *args, **kwargs)
    if touches:
      bucket, object_id = (
        request.params[k] for k in ('bucket_name', 'object_id')
      )
      try:
        found = storage.get_file_obj(bucket, object_id)
      except NotFound:
        return result
      now = datetime.datetime.now(datetime.timezone.utc)
      found['updated'] = now.strftime('%Y-%m-%dT%H:%M:%S.%fZ')
      storage.patch_object(bucket, object_id, found)
    return result

  return checked


def _patch_routes() -> None:
  """Adds moveTo and the download headers to the emulator's route table
  (read per request), once per process."""
  if getattr(emulator_server, '_vit_jax_patched', False):
    return
  routes = tuple(
    (
      rf'^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
      r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$',
      {emulator_server.POST: _move},
    )
    for prefix in (emulator_settings.API_ENDPOINT, '')
  )
  replaced = {
    _download: _download_with_generation,
    objects.insert: _with_preconditions(objects.insert),
    objects.delete: _with_preconditions(objects.delete),
    objects.patch: _with_preconditions(objects.patch, touches=True),
  }
  for pattern, handlers in emulator_server.HANDLERS:
    routes += (
      (
        pattern,
        {
          method: replaced.get(handler, handler)
          for method, handler in handlers.items()
        },
      ),
    )
  emulator_server.HANDLERS = routes
  # objects.get serves `alt=media` through the module's own `download`.
  objects.download = _download_with_generation
  emulator_server._vit_jax_patched = True  # noqa: SLF001


class _QuietServer(http_server.HTTPServer):
  """Ignores clients that hang up early (tensorstore, gcsfs do)."""

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      return
    super().handle_error(request, client_address)


class _ServerThread(emulator_server.APIThread):
  def run(self):
    self._httpd = _QuietServer(
      (self._host, self._port),
      functools.partial(emulator_server.RequestHandler, self._storage),
    )
    self.is_running.set()
    self._httpd.serve_forever()


class GcsEmulator:
  """`gs://test-bucket` served at `url` until `stop`."""

  def __init__(self):
    _patch_routes()
    port = helpers.free_port()
    self.url = f'http://127.0.0.1:{port}'
    self._server = emulator_server.create_server(
      '127.0.0.1', port, in_memory=True, default_bucket=BUCKET
    )
    self._server._api = _ServerThread(  # noqa: SLF001
      '127.0.0.1',
      port,
      self._server._storage,
      daemon=True,  # noqa: SLF001
    )
    self._server.start()

  def stop(self) -> None:
    self._server.stop()

  def environment(self) -> Dict[str, str]:
    """Variables that point gcsfs (epath's gs:// backend), google-auth and
    tensorstore at the emulator, with no credentials or metadata server."""
    return {
      'STORAGE_EMULATOR_HOST': self.url,
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      # Anonymous requests; the emulator checks no credentials.
      'FSSPEC_GCS_TOKEN': 'anon',
      'FSSPEC_GCS_PROJECT': PROJECT,
      'GOOGLE_CLOUD_PROJECT': PROJECT,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'NO_GCE_CHECK': 'true',
      # A metadata-server probe (tensorstore's credential search) is
      # refused at once, rather than waiting for 169.254.169.254.
      'GCE_METADATA_HOST': '127.0.0.1:1',
      'GCE_METADATA_ROOT': '127.0.0.1:1',
      'GCE_METADATA_IP': '127.0.0.1:1',
      # gcsfs would first ask the storage-control gRPC API for the bucket's
      # layout, which the emulator lacks (a 60 s timeout per bucket).
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    }
