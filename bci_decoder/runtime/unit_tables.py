"""UnitTables: everything session- and unit-specific the streaming engine reads.

Built in numpy from a model package (``model.package``): per unit the encoder key and
value projections ``W_k·LN(e_u)``, ``W_v·LN(e_u)`` and the embedding (the count path);
the <null> token's key and value; the output query (session + output-kind embedding) and
its decoder projection; the output's normalisation and columns. Immutable once built, so
the decode loop can swap a new set in between two steps (``StreamingEngine.set_units``)
without a new ONNX Runtime session: the graphs never hold a table.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from bci_decoder.model.normalizer import Normalizer
from bci_decoder.model.package import ModelPackage
from bci_decoder.model.session_readout import SessionReadout

_VERSIONS = itertools.count(1)


def _frozen(x: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class UnitTables:
    """Shapes: U session-local units, Hc encoder heads, Dh head dim, D model dim."""

    session_id: str
    output: str
    unit_names: tuple[str, ...]  # session-local index -> unit name
    k: np.ndarray  # (U, Hc, Dh) encoder key projection W_k·LN(e_u), unrotated
    v: np.ndarray  # (U, Hc, Dh) encoder value projection
    emb: np.ndarray  # (U, D) unit embeddings (the count path sums them)
    null_k: np.ndarray  # (Hc, 1, Dh) <null> token key
    null_v: np.ndarray  # (Hc, 1, Dh)
    query: np.ndarray  # (1, D) output query: session + output-kind embedding
    dec_q: np.ndarray  # (Hc, 1, Dh) its decoder projection, scaled, unrotated
    norm: Normalizer  # the output's normalisation (predictions are z-scores)
    out_slice: slice  # the output's columns in the concatenated heads
    version: int  # unique per build: stats() reports which tables are in use
    # the session's recurrent readout of the output (causal mode reads it instead of the
    # linear head), if one was fitted
    readout: SessionReadout | None = None

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @classmethod
    def build(
        cls,
        package: ModelPackage,
        session_id: str,
        output: str | None = None,
        unit_names: list[str] | None = None,
    ) -> UnitTables:
        """Tables of ``session_id`` (its units in vocabulary order unless ``unit_names``
        says otherwise) for ``output`` (default: the session's first normalised one)."""
        pkg = package
        if session_id not in pkg.sessions:
            raise KeyError(f"session {session_id!r} is unknown to this model; calibrate it first")
        norms = pkg.norms.get(session_id, {})
        output = output or next(iter(norms), pkg.output_names[0])
        if output not in norms:
            raise KeyError(
                f"session {session_id!r} has no normalisation for output {output!r} "
                f"(it has {sorted(norms)})"
            )
        known = pkg.session_unit_names(session_id)
        if unit_names is None:
            unit_names = known
        rows = pkg.units.lookup(f"{session_id}/{u}" for u in unit_names)
        readout = pkg.readout(session_id, output)
        if readout is not None and readout.units:  # its count inputs in the tables' order
            # (ModelPackage checked it reads every unit of the session)
            pos = {u: i for i, u in enumerate(known)}
            readout = readout.for_units(np.array([pos.get(u, -1) for u in unit_names]))
        table = pkg.arrays["unit_emb"]
        emb = table[rows]  # (U, D)
        k, v = pkg.keys_values(emb)
        k0, v0 = pkg.keys_values(table[:1])  # (1, Hc, Dh) <null>
        q = (
            pkg.arrays["session_emb"][pkg.sessions[session_id]]
            + pkg.arrays["output_emb"][pkg.output_index(output)]
        )
        return cls(
            session_id=session_id,
            output=output,
            unit_names=tuple(unit_names),
            k=_frozen(k),
            v=_frozen(v),
            emb=_frozen(emb),
            null_k=_frozen(k0.transpose(1, 0, 2)),
            null_v=_frozen(v0.transpose(1, 0, 2)),
            query=_frozen(q[None]),
            dec_q=_frozen(pkg.decoder_query(q)),
            norm=norms[output],
            out_slice=pkg.output_columns[output],
            version=next(_VERSIONS),
            readout=readout,
        )

    @classmethod
    def from_decoder(
        cls, decoder, session_id: str, output: str | None = None, unit_names=None
    ) -> UnitTables:
        """``build`` on a torch ``Decoder`` (training, evaluation and tests; imports torch)."""
        from bci_decoder.model.decoder import package_of

        return cls.build(package_of(decoder), session_id, output, unit_names)
