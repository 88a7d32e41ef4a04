"""The registered model's code, logged as MLflow "models from code" (no pickle): a SparseEncoder as a
pyfunc. It imports nothing from this project, so the registered model loads wherever mlflow and
sentence-transformers are installed:

    model = mlflow.pyfunc.load_model("models:/sparse-encoder@champion")
    model.predict(["a query"], params={"side": "query"})  # [{"indices": [...], "values": [...]}]

Texts in (a list, or a DataFrame's `text` column), one sparse vector out per text, as its active
dimensions and their weights; params side: "query" (encode_query) or "document" (encode_document,
the default).
"""

import mlflow
import pandas as pd


class SparseEncoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from sentence_transformers import SparseEncoder

        self.model = SparseEncoder(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):  # MLFlow passes a list as a one-column frame
            model_input = model_input["text"] if "text" in model_input else model_input.iloc[:, 0]
        texts = list(model_input)
        side = (params or {}).get("side", "document")
        encode = self.model.encode_query if side == "query" else self.model.encode_document
        vectors = encode(texts, convert_to_sparse_tensor=True).coalesce().cpu()
        rows, columns = vectors.indices()
        values = vectors.values()
        return [{"indices": columns[rows == i].tolist(), "values": values[rows == i].tolist()}
                for i in range(len(texts))]


mlflow.models.set_model(SparseEncoderModel())
