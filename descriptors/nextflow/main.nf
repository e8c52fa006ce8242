#!/usr/bin/env nextflow
// chimap over a BIDS dataset: one CHIMAP task per participant, outputs published as one
// BIDS derivative dataset in --outdir.
//   nextflow run descriptors/nextflow --bids_dir /data/bids --outdir /data/derivatives/chimap -profile apptainer
nextflow.enable.dsl = 2

include { CHIMAP } from './modules/chimap/main'

params.bids_dir = null
params.outdir = 'results/chimap'
// Comma-separated participant labels; default: every sub-* folder of bids_dir.
params.participants = null
// A chimap YAML configuration (see `chimap config --default`).
params.chimap_config = null
// Further chimap options for every task, e.g. '--method tkd'.
params.chimap_args = ''

workflow {
    if (!params.bids_dir) {
        error "Give the BIDS dataset with --bids_dir"
    }
    bids = file(params.bids_dir, checkIfExists: true, type: 'dir')
    labels = params.participants
        ? Channel.fromList(params.participants.tokenize(',').collect { it.trim() - 'sub-' })
        : Channel.fromPath("${params.bids_dir}/sub-*", type: 'dir').map { it.name - 'sub-' }
    config = params.chimap_config ? file(params.chimap_config, checkIfExists: true) : []

    CHIMAP(labels.map { label -> [[id: label], bids] }, config)

    CHIMAP.out.versions.unique().collectFile(name: 'chimap_versions.yml', storeDir: "${params.outdir}/logs")
}
