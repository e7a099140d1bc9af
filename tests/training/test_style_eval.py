"""tfmet.training.style.evaluate: confusion matrix, precision/recall and its image, by hand."""

import numpy as np

from tfmet.training.style import evaluate as style_eval


def test_confusion_and_precision_recall_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2, -1])
    predictions = np.array([0, 1, 1, 1, 0, 1, 2])
    matrix = style_eval.confusion_matrix(labels, predictions, 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [1, 2, 0], [0, 1, 0]])
    precision, recall, support = style_eval.precision_recall(matrix)
    np.testing.assert_allclose(precision, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(recall, [0.5, 2 / 3, 0.0])
    np.testing.assert_array_equal(support, [2, 3, 1])
    image = style_eval.confusion_image(matrix, cell=4)
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
