"""FactoredMatrix: a matrix kept as the product A @ B of two thinner factors.

    QK = model.QK                       # [n_layers, n_heads, d_model, d_model], hidden dim d_head
    QK[1, 3].eigenvalues                # [d_head] complex
    U, S, V = model.OV[0].svd()         # U [n_heads, d_model, d_head], S [n_heads, d_head]
    model.OV.norm()                     # Frobenius norms [n_layers, n_heads]

TransformerLens's class of the same name (transformer_lens/FactoredMatrix.py) with the same
methods and shapes: `ldim x rdim` matrices with hidden dimension `mdim` and any leading
(batch-like) dimensions, so products, norms, eigenvalues and the SVD never form the full
`ldim x rdim` matrix. Implemented here from the linear algebra, not copied.
"""

import warnings
from typing import Tuple, Union

import torch

__all__ = ["FactoredMatrix"]


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


class FactoredMatrix:
    """The matrix A @ B, A [..., ldim, mdim], B [..., mdim, rdim] (leading dims broadcast).

    Attributes:
        A, B: the factors, broadcast to the common leading shape.
        ldim, mdim, rdim: rows, hidden dimension, columns.
        shape: leading dims + (ldim, rdim).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.size(-1) != B.size(-2):
            raise ValueError(f"FactoredMatrix factors must agree on the inner dimension: "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.ldim, self.mdim, self.rdim = A.size(-2), A.size(-1), B.size(-1)
        try:
            leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:  # RuntimeError "Shape mismatch", as TransformerLens raises
            raise RuntimeError(f"Shape mismatch: FactoredMatrix leading dimensions do not "
                               f"broadcast: A {tuple(A.shape)}, B {tuple(B.shape)}") from e
        self.shape = torch.Size(tuple(leading) + (self.ldim, self.rdim))
        self.A = A.broadcast_to(tuple(leading) + (self.ldim, self.mdim))
        self.B = B.broadcast_to(tuple(leading) + (self.mdim, self.rdim))
        self.has_leading_dims = len(leading) > 0
        self._svd = None

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # ------------------------------------------------------------------ products

    @property
    def AB(self) -> torch.Tensor:
        """The full matrix [..., ldim, rdim] (large: the thing the factoring avoids)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """B @ A [..., mdim, mdim]; defined only for square matrices (ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix (ldim == rdim), shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        """The transpose, still factored: B^T @ A^T."""
        return FactoredMatrix(_t(self.B), _t(self.A))

    def __matmul__(self, other: Union[torch.Tensor, "FactoredMatrix"]):
        """self @ other: a FactoredMatrix, or a tensor [..., ldim] when other is a vector."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.dim() < 2:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.size(-2) != self.rdim:
            raise ValueError(f"cannot multiply FactoredMatrix {tuple(self.shape)} by {tuple(other.shape)}")
        # Keep the hidden dimension as small as possible.
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor):
        """other @ self: a FactoredMatrix, or a tensor [..., rdim] when other is a vector."""
        if other.size(-1) != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by FactoredMatrix {tuple(self.shape)}")
        if other.dim() < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Union[int, float, torch.Tensor]) -> "FactoredMatrix":
        """Scalar multiple (scales A)."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"FactoredMatrix * needs a scalar, got shape {tuple(scalar.shape)}; use @")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # ------------------------------------------------------------------ spectra

    def svd(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [..., ldim, mdim], S [..., mdim], V [..., rdim, mdim]) with M = U diag(S) V^T.

        From the SVDs of the factors: A = Ua Sa Va^T, B = Ub Sb Vb^T, so
        M = Ua (Sa Va^T Ub Sb) Vb^T and only the small mdim x mdim middle needs an SVD.
        """
        if self._svd is None:
            Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
            Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
            middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
            Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
            self._svd = (Ua @ Um, Sm, _t(Vhb) @ _t(Vhm))
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def V(self) -> torch.Tensor:
        return self.svd()[2]

    @property
    def Vh(self) -> torch.Tensor:
        """V itself (TransformerLens's historical name; deprecated there in favour of V)."""
        warnings.warn("FactoredMatrix.Vh returns V (right singular vectors); use .V",
                      DeprecationWarning, stacklevel=2)
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The mdim eigenvalues of BA (complex), which are AB's non-zero eigenvalues."""
        ba = self.BA
        if ba.dtype in (torch.float16, torch.bfloat16):
            ba = ba.float()
        return torch.linalg.eigvals(ba)

    def norm(self) -> torch.Tensor:
        """Frobenius norm per leading index: sqrt(sum of squared singular values)."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S)) @ (sqrt(S) V^T): each factor carries half the spectrum."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.V))

    def collapse_l(self) -> torch.Tensor:
        """diag(S) V^T [..., mdim, rdim]: the matrix with its left orthogonal factor removed."""
        return self.S[..., :, None] * _t(self.V)

    def collapse_r(self) -> torch.Tensor:
        """U diag(S) [..., ldim, mdim]: the matrix with its right orthogonal factor removed."""
        return self.U * self.S[..., None, :]

    # ------------------------------------------------------------------ indexing

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Indexes the leading dimensions; one more index picks rows, two more rows and columns.

        An int index on the row/column dimensions keeps that dimension (length 1), so the
        result stays a matrix.
        """
        if not isinstance(idx, tuple):
            idx = (idx,)
        n = len([i for i in idx if i is not None])
        lead = self.ndim - 2
        if n <= lead:
            return FactoredMatrix(self.A[idx], self.B[idx])

        def keep(i):
            if isinstance(i, int):
                return slice(i, i + 1 if i != -1 else None)
            return i

        if n == lead + 1:
            return FactoredMatrix(self.A[idx[:-1] + (keep(idx[-1]),)], self.B[idx[:-1]])
        if n == lead + 2:
            rows, cols = keep(idx[-2]), keep(idx[-1])
            return FactoredMatrix(self.A[idx[:-2] + (rows,)], self.B[idx[:-2] + (slice(None), cols)])
        raise ValueError(f"{idx} is too long an index for a FactoredMatrix of shape {tuple(self.shape)}")

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    @property
    def pair(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left k x k corner of the full matrix (of the first leading index)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        while corner.dim() > 2:
            corner = corner[0]
        return corner


def composition_scores(left: FactoredMatrix, right: FactoredMatrix,
                       broadcast_dims: bool = True) -> torch.Tensor:
    """||L R||_F / (||L||_F ||R||_F) for every pair of leading indices (Elhage et al. 2021).

    Args:
        left: e.g. OV circuits [..., d_model, d_model] writing to the residual stream.
        right: e.g. QK, QK.T or OV circuits reading from it.
        broadcast_dims: score every left index against every right index (output dims: left's
            leading dims, then right's); False: pair them elementwise.

    Returns:
        Scores in [0, 1].
    """
    if broadcast_dims:
        n_left, n_right = left.ndim - 2, right.ndim - 2
        for i in range(n_left):
            right = right.unsqueeze(i)
        for i in range(n_right):
            left = left.unsqueeze(i + n_left)
    if left.rdim != right.ldim:
        raise ValueError(f"composition needs left.rdim == right.ldim; shapes {tuple(left.shape)} "
                         f"and {tuple(right.shape)}")
    # Orthogonal outer factors do not change Frobenius norms: drop them to stay small.
    inner_left, inner_right = left.collapse_l(), right.collapse_r()
    product = torch.linalg.matrix_norm(inner_left @ inner_right)
    return product / torch.linalg.matrix_norm(inner_left) / torch.linalg.matrix_norm(inner_right)
