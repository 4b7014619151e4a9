//! Files on disk: model directories ([`checkpoint`]), atomic output directories ([`staged`]) and
//! the JSON reports written beside outputs ([`json`]).

pub mod checkpoint;
pub mod json;
pub mod staged;
