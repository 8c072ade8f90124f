"""Stage 4: the downstream session recommenders of the neural rows, trained, selected on validation, served.

Every neural row (`rows.py`) is one session encoder (`models/session_encoders.py`) over item inputs
[ID embedding ; W e_content], where the content features come from an export of the workdir (or are
absent for ID-only rows). Training examples are all prefixes of the train sessions with their next
click; the loss is the full-softmax cross-entropy. After every epoch the model is ranked on the
validation split (never on test) and the best epoch's parameters are kept. Each row trains, is served
and is recorded under its own settings (`msbr.per_model.<row>` over `msbr.*`).

    tables.py     training examples: prefix and session tables, length-bucketed batches
    features.py   the exported content features a row reads, and their normalisation
    settings.py   a row's effective config, its encoder and its model factory
    scoring.py    ranking targets after prefixes with a trained model
    selection.py  the validation selection of a row (selection.json) and the inputs it records
    params.py     the best parameters' file (best.npz)
    training.py   training with early stopping, and the test ranks of a row
    serving.py    loading a finished row for the inputs it was trained on
"""
