"""Classic session-based baselines: POP, S-POP, first-order Markov, session-kNN, and the synthetic oracle.

Every baseline is fitted on train sessions (int32 item-row arrays in time order, the last being the
most recent) and scores a chunk of prefixes as a dense float32 [b, N] matrix. Popularity enters as a
tie-break term in [0, 1) (`popularity_tiebreak`) added to integer primary scores, so the primary order
is never changed and every ranking is total up to items of equal popularity.
"""

import numpy as np
import scipy.sparse as sp


def item_counts(sessions, num_items: int) -> np.ndarray:
    """Occurrences of each item row in `sessions` (int64 [num_items])."""
    if not sessions:
        return np.zeros((num_items,), np.int64)
    return np.bincount(np.concatenate(sessions), minlength=num_items).astype(np.int64)


def popularity_tiebreak(counts) -> np.ndarray:
    """Dense rank of each count divided by the number of distinct counts: float64 in [0, 1).

    A dense rank keeps equal counts tied and spaces distinct counts by 1/#distinct, which stays far above
    float32 resolution when it is added to small integer scores.
    """
    distinct, dense_rank = np.unique(counts, return_inverse=True)
    return dense_rank.reshape(-1) / len(distinct)


def _session_item_matrix(sessions, num_items: int, binary: bool) -> sp.csr_matrix:
    """[len(sessions), num_items] sparse matrix of item counts per session (0/1 when `binary`)."""
    lengths = np.array([len(s) for s in sessions], dtype=np.int64)
    row_ids = np.repeat(np.arange(len(sessions)), lengths)
    columns = np.concatenate(sessions) if len(sessions) else np.zeros((0,), np.int64)
    matrix = sp.csr_matrix((np.ones(len(columns), np.float64), (row_ids, columns)),
                           shape=(len(sessions), num_items))
    matrix.sum_duplicates()
    if binary:
        matrix.data[:] = 1.0
    return matrix


class Pop:
    """POP: every prefix gets the train popularity (item counts) as scores."""

    def fit(self, train_sessions, num_items: int):
        self.counts = item_counts(train_sessions, num_items)
        return self

    def score(self, prefixes) -> np.ndarray:
        return np.broadcast_to(self.counts.astype(np.float32), (len(prefixes), len(self.counts))).copy()


class SessionPop:
    """S-POP: counts of each item in the current prefix, ties broken by train popularity."""

    def fit(self, train_sessions, num_items: int):
        self.num_items = num_items
        self.tiebreak = popularity_tiebreak(item_counts(train_sessions, num_items))
        return self

    def score(self, prefixes) -> np.ndarray:
        counts = _session_item_matrix(prefixes, self.num_items, binary=False).toarray()
        return (counts + self.tiebreak[None, :]).astype(np.float32)


class Markov:
    """First-order Markov chain: train transition counts from the last prefix item, plus popularity.

    An unseen last item has an all-zero row, so its ranking falls back to pure popularity.
    """

    def fit(self, train_sessions, num_items: int):
        pairs = [(s[:-1], s[1:]) for s in train_sessions if len(s) > 1]
        sources = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros((0,), np.int64)
        destinations = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros((0,), np.int64)
        self.transitions = sp.csr_matrix((np.ones(len(sources)), (sources, destinations)),
                                         shape=(num_items, num_items))
        self.transitions.sum_duplicates()
        self.tiebreak = popularity_tiebreak(item_counts(train_sessions, num_items))
        return self

    def score(self, prefixes) -> np.ndarray:
        last_items = np.array([p[-1] for p in prefixes], dtype=np.int64)
        return (self.transitions[last_items].toarray() + self.tiebreak[None, :]).astype(np.float32)


class SessionKNN:
    """Session-kNN (Jannach & Ludewig, 2017) over binary item sets with cosine similarity.

    Candidates are the `sample_size` most recent train sessions sharing an item with the prefix; the
    `k` most similar of them vote for their items with their similarity. Voted items rank by their votes,
    equal votes by popularity; items no neighbour contains follow, by popularity. The scores encode that
    order (1 + the dense rank of (votes, popularity) within the row for voted items, the popularity
    tie-break below 1 for the others), not the votes themselves.
    """

    def __init__(self, k: int, sample_size: int):
        self.k = k
        self.sample_size = sample_size

    def fit(self, train_sessions, num_items: int):
        self.num_items = num_items
        self.session_items = _session_item_matrix(train_sessions, num_items, binary=True)
        self.session_sizes = np.asarray(self.session_items.sum(axis=1)).reshape(-1)
        self.counts = item_counts(train_sessions, num_items)
        self.tiebreak = popularity_tiebreak(self.counts)
        return self

    def neighbour_weights(self, prefixes) -> sp.csr_matrix:
        """[b, num_train_sessions] sparse matrix of the chosen neighbours' cosine similarities."""
        queries = _session_item_matrix(prefixes, self.num_items, binary=True)
        overlaps = (queries @ self.session_items.T).tocsr()
        query_sizes = np.asarray(queries.sum(axis=1)).reshape(-1)
        rows, columns, values = [], [], []
        for row in range(len(prefixes)):
            start, end = overlaps.indptr[row], overlaps.indptr[row + 1]
            sessions, overlap = overlaps.indices[start:end], overlaps.data[start:end]
            # The most recent sessions have the largest indices (train is in time order).
            recent = np.argsort(-sessions, kind="stable")[:self.sample_size]
            sessions, overlap = sessions[recent], overlap[recent]
            similarity = overlap / np.sqrt(query_sizes[row] * self.session_sizes[sessions])
            # Stable sort on recency order: equal similarities prefer the more recent session.
            best = np.argsort(-similarity, kind="stable")[:self.k]
            rows.append(np.full(len(best), row))
            columns.append(sessions[best])
            values.append(similarity[best])
        return sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))),
                             shape=(len(prefixes), self.session_items.shape[0]))

    def votes(self, prefixes) -> sp.coo_matrix:
        """[b, num_items] sparse sums of the neighbours' similarities (only voted items stored)."""
        return (self.neighbour_weights(prefixes) @ self.session_items).tocoo()

    def score(self, prefixes) -> np.ndarray:
        votes = self.votes(prefixes)
        # Sorting (row, votes, popularity) triples gives each voted item its lexicographic dense rank;
        # rows are contiguous in that order, so subtracting the row's first rank keeps scores small.
        keys = np.stack([votes.row, votes.data, self.counts[votes.col]], axis=1).astype(np.float64)
        distinct, rank = np.unique(keys, axis=0, return_inverse=True)
        first = np.searchsorted(distinct[:, 0], votes.row)
        scores = np.tile(self.tiebreak, (len(prefixes), 1))
        scores[votes.row, votes.col] = 1.0 + rank.reshape(-1) - first
        return scores.astype(np.float32)


class Oracle:
    """The synthetic generator's true next-item scores (`data.oracle_scores(split)`), chunk by chunk.

    Its rows follow the examples of the split, so `score` takes example indices rather than prefixes.
    """

    def __init__(self, scores: np.ndarray):
        self.scores = scores

    def score(self, example_indices) -> np.ndarray:
        return self.scores[np.asarray(example_indices)]


def make_baseline(name: str, config):
    """An unfitted baseline by name (a baseline row of `rows.py` other than the oracle), with its knobs
    from `config.eval`."""
    makers = {"pop": Pop, "s-pop": SessionPop, "markov": Markov,
              "sknn": lambda: SessionKNN(k=config.eval.sknn_k, sample_size=config.eval.sknn_sample_size)}
    if name not in makers:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(makers)}")
    return makers[name]()
