"""MovieMatch ML: predicts the rating a user would give a movie, from six features and the app's own ratings."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moviematch-ml")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

SERVICE_NAME = "moviematch-ml"
