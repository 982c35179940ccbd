// What both AMX tile products share (amx_products.cpp: int8 tiles; amx_bf16_products.cpp: bf16 tiles): the
// permission Linux asks for before a process may use the tile registers, the tile configuration's layout, and a
// grouped product's rows cut into activation tiles of 16.
#pragma once
#if defined(GEMMA4_AMX)
#include <algorithm>
#include <cstdint>
#include <vector>
#include <sys/syscall.h>
#include <unistd.h>

// Linux lets a process use the tile registers once it asks (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
inline bool amx_permitted() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return ok;
}

// ldtilecfg's operand: palette 1, then each tile's bytes per row and rows.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// The rows of a grouped product (group g: rows offsets[g] .. offsets[g + 1]) in activation tiles of 16 rows, each
// group's own (its last one partly filled): group g's tiles are first[g] .. first[g + 1], tile t is group_of[t]'s,
// its rows start at row0(t) and it holds rows_in(t) of them.
struct RowTiles {
    static constexpr int64_t ROWS = 16;
    const std::vector<int64_t>& offsets;
    std::vector<int64_t> first{0}, group_of;
    explicit RowTiles(const std::vector<int64_t>& offsets_) : offsets(offsets_) {
        for (size_t g = 0; g + 1 < offsets.size(); ++g)
            first.push_back(first.back() + (offsets[g + 1] - offsets[g] + ROWS - 1) / ROWS);
        group_of.resize(first.back());
        for (size_t g = 0; g + 1 < first.size(); ++g)
            for (int64_t t = first[g]; t < first[g + 1]; ++t) group_of[t] = (int64_t)g;
    }
    int64_t count() const { return first.back(); }
    int64_t row0(int64_t t) const { return offsets[group_of[t]] + (t - first[group_of[t]]) * ROWS; }
    int64_t rows_in(int64_t t) const { return std::min(ROWS, offsets[group_of[t] + 1] - row0(t)); }
};
#endif
