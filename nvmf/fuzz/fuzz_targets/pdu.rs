//! Feeds arbitrary bytes to every parser a host can reach: the common
//! header and its layout checks, each PDU type, the SQE and its command
//! decoding, SGL descriptors, Connect data and DSM ranges. Any panic is a
//! bug; so is a layout that points outside its PDU.
#![no_main]

use cairn_nvmf::cmd::{Command, ConnectData, DataDesc, DsmRange, Sqe};
use cairn_nvmf::identify::{check_range, check_rw, NsGeometry};
use cairn_nvmf::pdu::{
    check_header_digest, CommonHeader, DataHeader, Digests, IcReq, IcResp, RxLimits, TermReq,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let digests = Digests::from_bits(sel & 3);
    let lim = RxLimits {
        digests,
        controller: sel & 4 == 0,
        max_incapsule: 8192,
        max_data: 128 * 1024,
    };
    if let Ok(ch) = CommonHeader::parse(bytes) {
        for l in [None, Some(&lim)] {
            if let Ok(layout) = ch.layout(l) {
                assert!(layout.header_len() <= layout.plen);
                assert!(layout.data_offset + layout.data_len <= layout.plen);
                if layout.data_len > 0 {
                    assert!(
                        layout.data_offset >= layout.header_len()
                            || !layout.pdu_type.digests_apply()
                    );
                    let _ = layout.pad_len();
                }
                if let Some(h) = bytes.get(..layout.header_len()) {
                    if layout.hdgst {
                        let _ = check_header_digest(h, layout.hlen);
                    }
                }
            }
        }
    }
    let _ = IcReq::parse(bytes);
    let _ = IcResp::parse(bytes);
    let _ = DataHeader::parse(bytes);
    let _ = TermReq::parse(bytes);
    let _ = ConnectData::parse(bytes);
    let _ = DsmRange::parse_all(bytes, u32::from(sel));
    if let Some(sqe) = Sqe::from_slice(bytes) {
        let _ = DataDesc::from_sqe(&sqe);
        for admin in [true, false] {
            if let Ok(Command::Read(rw) | Command::Write(rw) | Command::Compare(rw)) =
                Command::parse(&sqe, admin)
            {
                let g = NsGeometry {
                    block_size: 512,
                    num_blocks: 1 << 20,
                };
                if let Ok(len) = check_rw(&rw, Some(g), sqe.sgl_len()) {
                    assert!(check_range(rw.slba, u64::from(rw.blocks), g).is_ok());
                    assert_eq!(u64::from(len), u64::from(rw.blocks) * 512);
                }
            }
        }
    }
});
