"""Dataset readers (IDX, image folders), transforms and the split logic that keeps sets disjoint."""
