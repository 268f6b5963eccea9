"""The model's code as MLflow loads it (models from code): MLflow runs this file and takes the model it sets.

Logged this way, the package holds source, not a pickled object: loading it never unpickles (MLflow warns about
a pickled ``python_model`` at every save), and the code is the bytes of this checkout's file.
"""

from mlflow.models import set_model

from pipeline.model.package import LegoNetModel

set_model(LegoNetModel())
